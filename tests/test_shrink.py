"""shrink(): pruned channels removed physically, outputs unchanged."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from compress_callbacks.pruning.groups import trace_groups
from compress_callbacks.pruning.shrink import shrink

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from int8_inference import make_resnet  # noqa: E402
from test_pruning_groups import ConvBlock, Grouped, Residual  # noqa: E402


def randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


@torch.no_grad()
def prune_whole(model, example_inputs, every=2):
    """Zero every slice (weight rows, biases, BatchNorm channels) of every ``every``-th prunable unit."""
    groups = trace_groups(model, example_inputs)
    tensors = dict(model.named_parameters())
    chosen = groups.prunable()[::every]
    for unit in chosen:
        for name, dim, index in unit.slices:
            if name in tensors:
                tensors[name].select(dim, index).zero_()
    return chosen


def params(model):
    return sum(p.numel() for p in model.parameters())


PATTERNS = {
    "linear-act-linear": (lambda: nn.Sequential(nn.Linear(10, 20), nn.GELU(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 3)),
                          lambda: torch.randn(3, 10)),
    "conv-bn-act-conv": (lambda: randomize_bn(ConvBlock()), lambda: torch.randn(2, 3, 6, 6)),
    "residual": (lambda: randomize_bn(Residual()), lambda: torch.randn(2, 3, 6, 6)),
    "depthwise-grouped-flatten": (lambda: Grouped(), lambda: torch.randn(2, 3, 2, 2)),
    "resnet": (lambda: randomize_bn(make_resnet(8)), lambda: torch.randn(2, 3, 16, 16)),
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_shrunk_model_is_smaller_and_computes_the_same(pattern):
    torch.manual_seed(0)
    make, inputs = PATTERNS[pattern]
    model, x = make().eval(), inputs()
    chosen = prune_whole(model, x)
    assert chosen
    before = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pruned channel can go: no warning
        small = shrink(model, x)
    assert params(small) < params(model)
    assert [type(m) for m in small.modules()] == [type(m) for m in model.modules()]
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    fresh = torch.randn_like(x)  # not only on the inputs it was traced with
    torch.testing.assert_close(small(fresh), model(fresh), rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    for m in small.modules():
        if isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[:2] == (m.out_channels, m.in_channels // m.groups)
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean.shape == (m.num_features,)


def test_shrunk_model_matches_on_new_inputs_too():
    torch.manual_seed(1)
    model = randomize_bn(make_resnet(8))
    prune_whole(model, torch.randn(1, 3, 16, 16))
    small = shrink(model, torch.randn(1, 3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    convs = [m for m in small.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels < 8


def test_channel_with_a_live_bias_is_kept_and_named():
    """Conv rows zeroed but not their BatchNorm channel: a constant reaches the padded conv2, so the
    channels stay and the warning names the layer."""
    torch.manual_seed(0)
    model = ConvBlock().eval()
    with torch.no_grad():
        model.conv1.weight[:3] = 0
        model.bn1.bias[:3] = 0.2  # BN still adds its beta: the padded conv2 turns it into a border pattern
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"conv1: 3 pruned channel\(s\) kept"):
        small = shrink(model, x)
    assert small.conv1.out_channels == 6
    torch.testing.assert_close(small(x), model(x))


def test_channels_normalised_together_are_kept_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight[0] = 0
        model[0].bias[0] = 0
    with pytest.warns(UserWarning, match="0: 1 pruned channel.*layer_norm"):
        small = shrink(model, torch.randn(2, 4))
    assert small[0].out_features == 6


def test_unsupported_pattern_raises_before_any_change():
    class Sorts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.sort(self.a(x), dim=-1).values)

    model = Sorts()
    with torch.no_grad():
        model.a.weight[0] = 0
        model.a.bias[0] = 0
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"\['a'\].*sort"):
        shrink(model, torch.randn(2, 4))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 8), nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x, y=None):
        return self.out(torch.relu(self.a(x) + self.b(y)))


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_example_inputs_as_tuple_or_dict(form):
    torch.manual_seed(0)
    model = TwoInputs()
    x, y = torch.randn(2, 4), torch.randn(2, 3)
    inputs = (x, y) if form == "tuple" else {"x": x, "y": y}
    chosen = prune_whole(model, inputs)
    assert {frozenset(u.producers) for u in chosen} == {frozenset({"a.weight", "b.weight"})}  # the add joins a and b
    small = shrink(model, inputs)
    assert small.a.out_features == small.b.out_features == small.out.in_features == 4
    torch.testing.assert_close(small(x, y), model(x, y))


def test_bad_example_inputs_name_the_argument():
    with pytest.raises(TypeError, match="example_inputs"):
        shrink(nn.Linear(2, 2), 3.0)
