"""The callbacks' read-only views of their state: ``GradualMagnitudePruning.weights`` / ``.masks`` and
``QuantizationAwareTraining.ranges``, which the other tests read instead of private attributes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining
from compress_callbacks.quantization import fake_quant as FQ
from compress_callbacks.quantization.spec import get_qparams


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        F.cross_entropy(model(torch.randn(8, 12, generator=g)), torch.randint(0, 3, (8,), generator=g)).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_gmp_weights_and_masks_are_read_only_views_of_the_pruning():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gmp = GradualMagnitudePruning(0.75, start_step=2, end_step=4, update_every=1, exclude=["4"])
    assert dict(gmp.weights) == {} and dict(gmp.masks) == {}  # before attach
    manager = CompressionManager(gmp)
    manager.attach(model, optimizer)
    assert list(gmp.weights) == list(gmp.masks) == ["0", "2"]
    assert all(gmp.weights[name] is model.get_submodule(name).weight for name in ("0", "2"))
    assert all(mask.dtype == torch.bool and mask.all() for mask in gmp.masks.values())  # nothing pruned yet
    train(model, optimizer, 5)
    state = gmp.state_dict()
    for (name, mask), saved in zip(gmp.masks.items(), state["masks"]):
        weight = gmp.weights[name].detach()
        assert mask.shape == weight.shape and torch.equal(mask, saved)
        assert torch.equal(mask, weight != 0) and float((~mask).float().mean()) == pytest.approx(0.75)
    with pytest.raises(TypeError):
        gmp.masks["0"] = torch.ones(32, 12, dtype=torch.bool)
    with pytest.raises(AttributeError):
        gmp.masks = {}
    with pytest.raises(TypeError):
        gmp.weights["4"] = model[4].weight
    gmp.masks["0"].fill_(True)  # a copy: the pruning keeps its mask
    train(model, optimizer, 1)
    assert float((model[0].weight == 0).float().mean()) == pytest.approx(0.75)
    assert not gmp.masks["0"].all()
    manager.finalize(model)
    assert dict(gmp.weights) == {} and dict(gmp.masks) == {}


def test_qat_ranges_are_the_observed_input_ranges_behind_the_scales():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    qat = QuantizationAwareTraining(start_step=2)
    manager = CompressionManager(qat)
    manager.attach(model, optimizer)
    assert dict(qat.ranges) == {}
    train(model, optimizer, 2)
    assert dict(qat.ranges) == {}  # fake-quant not active yet: nothing observed
    train(model, optimizer, 3)
    ranges = qat.ranges
    assert list(ranges) == ["0", "2", "4"]
    state = qat.state_dict()
    lows, highs = zip(*ranges.values())
    assert torch.equal(torch.stack(lows), state["running_min"]) and torch.equal(torch.stack(highs), state["running_max"])
    assert all(float(lo) < float(hi) for lo, hi in ranges.values())
    assert float(ranges["2"][0]) == 0.0  # after a ReLU the smallest input is 0
    with pytest.raises(TypeError):
        ranges["0"] = (torch.tensor(0.0), torch.tensor(1.0))
    qat.ranges["0"][1].fill_(1e6)  # a copy: the observer keeps its range
    assert torch.equal(qat.state_dict()["running_max"], state["running_max"])
    manager.finalize(model)
    assert dict(qat.ranges) == {}
    for name, (lo, hi) in ranges.items():
        scale, zero_point = FQ.activation_qparams(lo, hi)
        spec = get_qparams(model)[name]
        assert (spec.input_scale, spec.input_zero_point) == (float(scale), int(zero_point))


def test_qat_ranges_are_empty_for_weight_only_quantization():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    qat = QuantizationAwareTraining(start_step=0, activation_bits=None)
    CompressionManager(qat).attach(model, optimizer)
    train(model, optimizer, 2)
    assert dict(qat.ranges) == {}
