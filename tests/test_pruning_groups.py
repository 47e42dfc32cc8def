"""Channel groups found from the traced data flow (compress_callbacks.pruning.groups)."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from compress_callbacks.pruning.groups import trace_groups

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_models import ConvBlock, Grouped, HeadNormAttention, Residual  # noqa: E402


def unit_with(groups, name, dim, index):
    found = [u for u in groups.units if (name, dim, index) in u.slices]
    assert len(found) == 1
    return found[0]


def test_linear_channel_owns_its_row_bias_and_the_next_layers_column():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    groups = trace_groups(model, torch.randn(2, 4))
    unit = unit_with(groups, "0.weight", 0, 3)
    assert sorted(unit.slices) == [("0.bias", 0, 3), ("0.weight", 0, 3)]
    assert unit.columns == [("2.weight", 1, 3)]
    assert unit.producers == {"0.weight"}
    assert "reaches the model's output" in unit_with(groups, "2.weight", 0, 0).problems
    assert len(groups.prunable()) == 6 and groups.removable() == []  # nothing is zero yet


def test_batchnorm_channel_goes_with_the_conv_channel():
    groups = trace_groups(ConvBlock().eval(), torch.randn(1, 3, 5, 5))
    unit = unit_with(groups, "conv1.weight", 0, 2)
    assert {s for s in unit.slices if s[0].startswith("bn1.")} == {
        ("bn1.weight", 0, 2), ("bn1.bias", 0, 2), ("bn1.running_mean", 0, 2), ("bn1.running_var", 0, 2)}
    assert unit.columns == [("conv2.weight", 1, 2)]


def test_residual_add_joins_the_channels_that_meet():
    groups = trace_groups(Residual().eval(), torch.randn(1, 3, 4, 4))
    unit = unit_with(groups, "stem.weight", 0, 5)
    assert unit.producers == {"stem.weight", "conv.weight"}
    assert ("conv.weight", 0, 5) in unit.slices and ("bn.weight", 0, 5) in unit.slices
    assert set(unit.columns) == {("conv.weight", 1, 5), ("head.weight", 1, 5)}
    assert len([u for u in groups.prunable() if u.producers == {"stem.weight", "conv.weight"}]) == 8


def test_depthwise_grouped_and_flatten():
    groups = trace_groups(Grouped().eval(), torch.randn(1, 3, 2, 2))
    # depthwise: input channel c takes its output channels 2c and 2c+1; the grouped conv then joins
    # input position i of every group (channels i and 4 + i), so c1's channels 0 and 2 go together
    unit = unit_with(groups, "c1.weight", 0, 0)
    assert {("dw.weight", 0, 0), ("dw.weight", 0, 1), ("c1.weight", 0, 2), ("dw.weight", 0, 4), ("dw.weight", 0, 5)} <= set(unit.slices)
    assert {c for c in unit.columns if c[0] == "gc.weight"} == {("gc.weight", 1, 0), ("gc.weight", 1, 1)}
    # grouped conv: output m of each group goes together; flattened, each channel is 4 features of fc
    out = unit_with(groups, "gc.weight", 0, 1)
    assert {s for s in out.slices if s[0] == "gc.weight"} == {("gc.weight", 0, 1), ("gc.weight", 0, 4)}
    assert sorted(c[2] for c in out.columns) == [4, 5, 6, 7, 16, 17, 18, 19]


def test_layer_norm_over_channels_keeps_them():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    groups = trace_groups(model, torch.randn(2, 4))
    assert any("layer_norm" in p for p in unit_with(groups, "0.weight", 0, 0).problems)
    assert groups.prunable() == []


def test_a_sigmoid_or_a_live_bias_leaves_a_channel_nonzero():
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x)))  # sigmoid(0) = 0.5: never exactly zero

    groups = trace_groups(Gate(), torch.randn(2, 4))
    assert not unit_with(groups, "a.weight", 0, 0).zero_if_pruned
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight[1] = 0  # the row, not the bias: relu(bias) still reaches layer 2
        model[0].weight[2] = 0
        model[0].bias[2] = 0
    groups = trace_groups(model, torch.randn(2, 4))
    assert [u.index for u in groups.removable()] == [unit_with(groups, "0.weight", 0, 2).index]


def test_batchnorm_zeroes_a_channel_only_with_gamma_and_beta():
    model = ConvBlock().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(0.5, 1.0)
        model.conv1.weight[1] = 0
        model.conv1.bias[1] = 0  # BN still adds beta - mean * gamma / std
    groups = trace_groups(model, torch.randn(1, 3, 5, 5))
    assert not unit_with(groups, "conv1.weight", 0, 1).zero_now
    with torch.no_grad():
        model.bn1.weight[1] = 0
        model.bn1.bias[1] = 0
    groups = trace_groups(model, torch.randn(1, 3, 5, 5))
    assert unit_with(groups, "conv1.weight", 0, 1).zero_now


def test_an_op_the_tracer_does_not_know_is_reported():
    class Sorts(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.b(torch.sort(self.a(x), dim=-1).values)

    groups = trace_groups(Sorts(), torch.randn(2, 4))
    assert any("sort" in w for w in unit_with(groups, "a.weight", 0, 0).unsupported)


def test_example_inputs_must_be_tensor_tuple_or_dict():
    with pytest.raises(TypeError, match="example_inputs"):
        trace_groups(nn.Linear(2, 2), [[1.0, 2.0]].__iter__())


def test_attention_heads_are_units_and_a_shared_scale_does_not_merge_them():
    groups = trace_groups(HeadNormAttention(), torch.randn(2, 5, 16))
    heads = [u for u in groups.prunable() if u.kind == "head"]
    assert len(heads) == 4
    head = unit_with(groups, "v.weight", 0, 5)  # head 1: rows 4..7 of q, k and v, columns 4..7 of o
    assert {(n, i) for n, _, i in head.slices if n.endswith("weight")} == {(n, i) for n in ("q.weight", "k.weight", "v.weight") for i in range(4, 8)}
    assert sorted(c[2] for c in head.columns) == [4, 5, 6, 7]
    assert not any(s[0] == "scale" for u in heads for s in u.slices)  # shared by all heads: owned by none


def test_a_quantization_aware_model_is_traced_as_its_float_layers():
    """QAT's fake-quant and BatchNorm fold sit between the weights and the convs: the groups are the float model's."""
    from compress_callbacks import CompressionManager, QuantizationAwareTraining

    model = ConvBlock()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    CompressionManager(QuantizationAwareTraining(start_step=0)).attach(model, optimizer)
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    optimizer.step()
    classes = [type(m).__name__ for m in model.modules()]
    groups = trace_groups(model, torch.randn(1, 3, 5, 5))
    assert [type(m).__name__ for m in model.modules()] == classes and "QATConv2d" in classes  # put back
    unit = unit_with(groups, "conv1.weight", 0, 2)
    assert ("bn1.weight", 0, 2) in unit.slices and unit.columns == [("conv2.weight", 1, 2)]


def test_a_linear_with_a_computed_weight_is_reported_not_mistaken_for_attention():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.utils.parametrizations.weight_norm(nn.Linear(6, 3)))
    groups = trace_groups(model, torch.randn(2, 4))
    unit = unit_with(groups, "0.weight", 0, 1)
    assert any("computed weight" in p for p in unit.problems + unit.unsupported)
