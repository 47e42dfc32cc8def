"""Which modules a technique touches: `modules` / `exclude` on real model shapes, and unwrapping."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining
from compress_callbacks.quantization.spec import get_qparams
from compress_callbacks.targets import select_modules, unwrap_model


def model_with_head():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 3))


def train(model, optimizer, steps, width=8):
    for _ in range(steps):
        model(torch.randn(4, width)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("make", [
    lambda: GradualMagnitudePruning(0.5, 0, 4, exclude=["3", "classifer"]),
    lambda: GradualMagnitudePruning(0.5, 0, 4, exclude=["re:.*classifier.*"]),
    lambda: QuantizationAwareTraining(exclude=["3", "classifer"]),
])
def test_exclude_that_matches_nothing_raises_naming_it_and_touches_nothing(make):
    model = model_with_head()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CompressionManager(make())
    with pytest.raises(ValueError, match=r"`exclude`: '(classifer|re:\.\*classifier\.\*)' matches no module of Sequential"):
        manager.attach(model, optimizer)
    assert not manager.attached and not optimizer._optimizer_step_pre_hooks
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_exclude_that_matches_is_honoured():
    names = [name for name, _ in select_modules(model_with_head(), exclude=["3", "re:2\\..*"])]
    assert names == ["0"]


def test_a_regex_that_also_matches_a_container_skips_it():
    model = model_with_head()  # "2" is a Sequential without a weight; "2.0" is a Linear inside it
    assert [name for name, _ in select_modules(model, modules=["re:2.*"])] == ["2.0"]
    gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=1, modules=["re:2.*", "3"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    CompressionManager(gmp).attach(model, optimizer)
    train(model, optimizer, 1)
    assert list(gmp.layer_sparsities()) == ["2.0", "3"]


def test_a_name_or_regex_without_any_weight_still_raises():
    with pytest.raises(ValueError, match="module '2' has no `weight`"):
        select_modules(model_with_head(), modules=["2"])
    with pytest.raises(ValueError, match=r"'re:1\|2' matches only modules without a `weight`.*'1', '2'"):
        select_modules(model_with_head(), modules=["re:1|2"])


@pytest.mark.parametrize("technique", ["pruning", "qat"])
def test_generators_for_modules_and_exclude_are_read_once(technique):
    modules = (name for name in ["0", "2.0", "3"])
    exclude = (name for name in ["3"])
    if technique == "pruning":
        callback = GradualMagnitudePruning(0.5, start_step=0, end_step=1, modules=modules, exclude=exclude)
    else:
        callback = QuantizationAwareTraining(modules=modules, exclude=exclude)
    model = model_with_head()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    CompressionManager(callback).attach(model, optimizer)
    train(model, optimizer, 2)
    touched = [row["module"] for row in callback.summary_rows()]
    assert touched == ["0", "2.0"]  # not the default selection (which would add "3" too)
    assert (callback.modules, callback.exclude) == (["0", "2.0", "3"], ["3"])
    assert callback.config()["modules"] == ["0", "2.0", "3"]  # the recipe holds what was selected


@pytest.mark.parametrize("layer", [lambda: nn.Linear(8, 6), lambda: nn.Conv1d(8, 6, 1)])
@pytest.mark.parametrize("modules", [None, "type", ""])
def test_a_bare_layer_as_the_model_is_pruned(layer, modules):
    torch.manual_seed(0)
    model = layer()
    spec = {None: None, "type": [type(model)], "": [""]}[modules]
    gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=1, modules=spec)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    CompressionManager(gmp).attach(model, optimizer)
    shape = (4, 8) if isinstance(model, nn.Linear) else (4, 8, 5)
    for _ in range(2):
        model(torch.randn(*shape)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert gmp.layer_sparsities() == {"": 0.5}
    assert float((model.weight == 0).float().mean()) == 0.5


def test_a_bare_linear_as_the_model_is_quantized_and_finalized():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CompressionManager(QuantizationAwareTraining(start_step=0, weight_bits=4))
    manager.attach(model, optimizer)
    train(model, optimizer, 3)
    compressed = manager.finalize(model)
    assert type(compressed) is nn.Linear
    spec = get_qparams(compressed)[""]
    codes = compressed.weight / spec.weight_scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7


def test_unwrap_model_strips_nested_wrappers_in_any_order():
    model = model_with_head()
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(nn.DataParallel(model)) is model
    # a compiled model inside a data-parallel wrapper: one pass of Accelerate's extraction leaves the compiled one
    assert unwrap_model(nn.DataParallel(torch.compile(model))) is model
    assert unwrap_model(torch.compile(nn.DataParallel(model))) is model
    names = [name for name, _ in select_modules(nn.DataParallel(torch.compile(model)))]
    assert names == ["0", "2.0", "3"]
