"""GradualMagnitudePruning on the layers and optimizers people use: every built-in optimizer keeps
pruned weights and their state exactly zero, ConvTranspose channels, and no layer pruned away."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compress_callbacks import CompressionManager, GradualMagnitudePruning
from compress_callbacks.pruning.gmp import ZERO_PRESERVING_OPTIMIZERS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on shared cores


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


def test_conv_transpose_channel_pruning_removes_output_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ConvTranspose2d(4, 6, 3))  # weight [in=4, out=6, 3, 3]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=2, update_every=1, granularity="channel",
                                  modules=[nn.ConvTranspose2d])
    CompressionManager(gmp).attach(model, optimizer)
    train(model, optimizer, 3, shape=(2, 3, 6, 6))
    weight = model[2].weight.detach()
    dead = (weight != 0).sum(dim=(0, 2, 3)) == 0  # output channels with no weight left
    assert int(dead.sum()) == 3
    assert bool((weight != 0).any(dim=(1, 2, 3)).all())  # every input channel still feeds the layer
    out = model(torch.randn(2, 3, 6, 6)).detach()
    for channel in dead.nonzero().flatten().tolist():  # a pruned output channel is its bias, whatever the input
        assert torch.allclose(out[:, channel], model[2].bias[channel].detach().expand_as(out[:, channel]))


@pytest.mark.parametrize("granularity", ["channel", "2:4"])
def test_grouped_conv_transpose_is_refused_for_structured_pruning_before_anything_is_touched(granularity):
    model = nn.Sequential(nn.ConvTranspose2d(4, 8, 2, groups=2))
    before = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    manager = CompressionManager(GradualMagnitudePruning(None if ":" in granularity else 0.5, start_step=0, end_step=2,
                                                         granularity=granularity, modules=["0"]))
    with pytest.raises(ValueError, match=r"`granularity`.*'0' is a ConvTranspose2d with groups=2"):
        manager.attach(model, optimizer)
    assert not manager.attached and torch.equal(model[0].weight, before)


def test_global_scope_never_prunes_a_layer_away_and_says_which_layer_it_kept():
    """At 0.9 overall, the middle layer's small weights would all go (it computed a constant)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[2].weight.mul_(0.01)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gmp = GradualMagnitudePruning(0.9, start_step=0, end_step=3, update_every=1, scope="global")
    CompressionManager(gmp).attach(model, optimizer)
    with pytest.warns(UserWarning) as caught:
        train(model, optimizer, 4)
    assert any("'2' is pruned down to its last weight (of 2048)" in str(w.message) for w in caught)
    assert int((model[2].weight != 0).sum()) == 1
    assert all(bool((w != 0).any()) for w in gmp.weights.values())
    total = sum(w.numel() for w in gmp.weights.values())
    assert gmp.overall_sparsity() == pytest.approx(round(0.9 * total) / total, abs=0)  # still exact overall


def test_layer_scope_keeps_the_strongest_channel_of_a_small_head():
    """0.9 of a 4-class head's 4 channels rounds to 4: the head keeps one channel, with a warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gmp = GradualMagnitudePruning(0.9, start_step=0, end_step=2, update_every=1, granularity="channel")
    CompressionManager(gmp).attach(model, optimizer)
    with pytest.warns(UserWarning, match=r"'2' is pruned down to its last output channel \(of 4\)") as caught:
        train(model, optimizer, 3)
    assert len([w for w in caught if "'2'" in str(w.message)]) == 1  # once, not at every update
    head = model[2].weight.detach()
    assert int((head != 0).any(dim=1).sum()) == 1
    first = model[0].weight.detach()
    assert int((first == 0).all(dim=1).sum()) == round(0.9 * 64)  # the large layer still reaches the target
