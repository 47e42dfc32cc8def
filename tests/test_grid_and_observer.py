"""One home for the quantization math: the weight grid / BN fold (``quantization.grid``) and range
observation (``quantization.observer``), as fake-quant, the spec, PTQ, QAT and export use them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from onnx import helper, numpy_helper, TensorProto

from compress_callbacks import CompressionManager, QuantizationAwareTraining
from compress_callbacks.export.onnx_passes import _constant_weights, _fold_weight_quantizers
from compress_callbacks.export.ort import _calibrated_ranges
from compress_callbacks.quantization import fake_quant as FQ
from compress_callbacks.quantization.grid import channel_view, dequantize_codes, weight_codes
from compress_callbacks.quantization.observer import RangeObserver, moving_average_range
from compress_callbacks.quantization.ptq import calibrate
from compress_callbacks.quantization.spec import LayerQuantSpec, get_qparams, quantize_weight

# w / s and w * (1 / s) round to different integers here (found by search): -124 against -123
TIE_WEIGHT, TIE_SCALE = -6.2522687911987305, 0.05062565952539444


def _weight_graph(weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray):
    """QuantizeLinear(weight initializer) -> DequantizeLinear along axis 0, as the exporter writes it."""
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=0),
             helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["y"], axis=0)]
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(zero_point, "z")]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(weight.shape))],
                              initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _folded_codes(model) -> np.ndarray:
    dq = model.graph.node[0]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zero_point = channel_view(inits[dq.input[2]].astype(np.int32), inits[dq.input[0]].ndim)
    return inits[dq.input[0]].astype(np.int32) - zero_point


@pytest.mark.parametrize("native", [True, False])
def test_fake_quant_spec_and_onnx_round_a_weight_to_the_same_codes(native, monkeypatch):
    if not native:
        monkeypatch.setenv("COMPRESS_CALLBACKS_NATIVE", "0")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, 3, generator=g)
    weight[0] = 0.0  # a pruned channel
    weight[1, 0, 0] = -0.0
    weight[2, 0, :2] = torch.tensor([TIE_WEIGHT, 1.0])
    scale = FQ.per_channel_weight_scale(weight, 8)
    scale[2] = TIE_SCALE  # max |w| / 127 would not reach the tie; this scale still clips nothing
    assert (weight[2].abs().max() / scale[2]) < 127
    simulated = FQ.fake_quantize_weight_with_scale(weight, scale)
    spec = LayerQuantSpec(weight_bits=8, weight_scale=scale)
    codes = quantize_weight(weight, spec)
    assert codes[2, 0, 0] == -123 and codes[0].eq(0).all()
    assert torch.equal(dequantize_codes(codes, scale), simulated)  # the spec's codes are fake-quant's
    assert torch.equal(quantize_weight(simulated, spec), codes)  # and snapping keeps them
    for weight_dtype in ("int8", "uint8"):
        model = _weight_graph(weight.numpy(), scale.numpy(), np.zeros(6, np.int8))
        _fold_weight_quantizers(model, weight_dtype)
        assert [node.op_type for node in model.graph.node] == ["DequantizeLinear"]
        assert np.array_equal(_folded_codes(model), codes.numpy().astype(np.int32)), weight_dtype


def test_weight_codes_clamp_to_the_grid_of_the_bits_and_broadcast_along_any_dim():
    weight = torch.tensor([[3.0, -9.0], [0.4, 0.6]])
    assert weight_codes(weight, torch.tensor([1.0, 0.2]), bits=4).tolist() == [[3.0, -7.0], [2.0, 3.0]]
    along_columns = weight_codes(weight, torch.tensor([1.0, 3.0]), bits=8, dim=1)
    assert along_columns.tolist() == [[3.0, -3.0], [0.0, 0.0]]
    assert channel_view(np.arange(3.0), 4, dim=-1).shape == (1, 1, 1, 3)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_codes_skip_the_clamp_only_where_it_changes_nothing(bits, monkeypatch):
    """Fake-quant's torch path skips the clamp (its scale comes from max |w|): bit-identical codes."""
    monkeypatch.setenv("COMPRESS_CALLBACKS_NATIVE", "0")
    g = torch.Generator().manual_seed(bits)
    weight = torch.randn(64, 33, generator=g) * torch.logspace(-30, 30, 64)[:, None]
    weight[0] = 0.0  # a pruned channel
    weight[1] = torch.full((33,), 1e-40)  # denormal: the scale floor
    weight[2] = -weight[2].abs()  # the channel's max |w| is negative
    scale = FQ.per_channel_weight_scale(weight, bits)
    clamped = weight_codes(weight, scale, bits)
    assert torch.equal(weight_codes(weight, scale, bits, clamp=False), clamped)
    assert torch.equal(FQ.fake_quantize_weight_with_scale(weight, scale, bits), dequantize_codes(clamped, scale))
    # a smaller scale reaches past the grid's ends: there the clamp is what keeps codes on the grid
    qmax = 2 ** (bits - 1) - 1
    assert weight_codes(weight, scale / 2, bits, clamp=False).abs().max() > qmax
    assert weight_codes(weight, scale / 2, bits).abs().max() == qmax


def test_constant_weights_are_exactly_what_dequantize_linear_computes():
    import onnxruntime as ort

    g = np.random.default_rng(0)
    inits = [numpy_helper.from_array(g.integers(0, 256, size=(5, 7)).astype(np.uint8), "c"),
             numpy_helper.from_array(g.uniform(1e-3, 1e-1, size=5).astype(np.float32), "s"),
             numpy_helper.from_array(np.full(5, 128, np.uint8), "z")]
    dequantize = helper.make_node("DequantizeLinear", ["c", "s", "z"], ["w"], axis=0)
    layer = helper.make_node("MatMul", ["x", "w"], ["y"])

    def model(nodes, inputs, outputs):
        graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    probe = model([dequantize], [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, [5, 7])])
    expected = ort.InferenceSession(probe.SerializeToString(), options).run(None, {})[0]
    onnx_model = model([dequantize, layer], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 7])])
    _constant_weights(onnx_model, [onnx_model.graph.node[1]])
    assert [node.op_type for node in onnx_model.graph.node] == ["MatMul"]
    folded = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer}[onnx_model.graph.node[0].input[1]]
    assert folded.dtype == np.float32 and np.array_equal(folded, expected)


def test_range_observer_min_max_and_moving_average():
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 5, generator=g) * (i + 1) for i in range(4)]
    observer = RangeObserver(3)
    for batch in batches:
        observer.observe(0, batch)
        observer.observe(1, batch[:1])
    observer.observe(0, torch.zeros(0))  # nothing to see
    everything = torch.cat([b.flatten() for b in batches])
    firsts = torch.cat([b[:1].flatten() for b in batches])
    assert observer.observed_min.tolist()[:2] == [everything.min().item(), firsts.min().item()]
    assert observer.observed_max.tolist()[:2] == [everything.max().item(), firsts.max().item()]
    assert observer.seen.tolist() == [True, True, False]
    observer.running_min[:] = torch.tensor([-1.0, -2.0, -3.0])
    observer.running_max[:] = torch.tensor([1.0, 2.0, 3.0])
    low, high = observer.observed_min.clone(), observer.observed_max.clone()
    ema_min, ema_max = moving_average_range(observer.running_min.clone(), observer.running_max.clone(), low, high, 0.25)
    observer.fold_moving_average(0.25, fresh=[1])
    assert observer.running_min.tolist() == [ema_min[0].item(), low[1].item(), -3.0]  # EMA / fresh / unseen
    assert observer.running_max.tolist() == [ema_max[0].item(), high[1].item(), 3.0]
    assert not observer.seen.any()  # folding starts a new observation window


def test_qat_ptq_and_export_calibration_observe_ranges_alike():
    """The three users of the observer record the same min / max for the same tensor stream."""
    torch.manual_seed(2)
    batches = [torch.randn(8, 6) * 3 for _ in range(3)]
    expected = (min(b.min() for b in batches).item(), max(b.max() for b in batches).item())
    model = calibrate(nn.Sequential(nn.Linear(6, 4)).eval(), batches)
    spec = get_qparams(model)["0"]
    scale, zero_point = FQ.activation_qparams(torch.tensor(expected[0]), torch.tensor(expected[1]))
    assert (spec.input_scale, spec.input_zero_point) == (float(scale), int(zero_point))

    identity = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]), opset_imports=[helper.make_opsetid("", 17)])
    low, high = _calibrated_ranges(identity, ["y"], batches)["y"]
    assert (low.item(), high.item()) == expected

    layer = nn.Sequential(nn.Linear(6, 4))
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    qat = QuantizationAwareTraining(start_step=0)
    CompressionManager(qat).attach(layer, optimizer)
    for batch in batches:  # one real update over three micro-batches: the first observation is taken whole
        layer(batch).sum().backward()
    optimizer.step()
    row = qat.summary_rows()[0]
    assert (row["input_min"], row["input_max"]) == expected
