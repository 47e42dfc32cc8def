"""Export: int8 models (ONNX Runtime, Inductor), Q/DQ ONNX files, compact checkpoints; PTQ calibration.

Stated tolerance for every int8 backend against the fake-quant model it came from: the largest
absolute difference is at most 1% of the largest absolute output (``INT8_TOLERANCE``). Integer
kernels differ from the float simulation only where an accumulated value lands on a rounding
boundary of the next layer's input quantization (one code), so typical errors are far below it.
"""

from __future__ import annotations

import copy
import io
import os
import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import numpy_helper

from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining
from compress_callbacks.export import (
    export_onnx,
    load_compressed,
    quantized_copy,
    save_compressed,
    to_int8,
)
from compress_callbacks.quantization.grid import batchnorm_fold_factor
from compress_callbacks.quantization.ptq import calibrate, fake_quantized
from compress_callbacks.quantization.spec import LayerQuantSpec, get_qparams, quantize_weight

INT8_TOLERANCE = 0.01  # of max |reference output|


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def randomize_bn(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def prune_half(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                w = module.weight
                w.mul_((w.abs() > w.abs().flatten().median()).to(w.dtype))
    return model


@pytest.fixture()
def cnn_batches():
    torch.manual_seed(0)
    return [torch.randn(8, 3, 8, 8) for _ in range(3)]


@pytest.fixture()
def ptq_cnn(cnn_batches):
    torch.manual_seed(0)
    return calibrate(prune_half(randomize_bn(make_cnn())).eval(), cnn_batches)


def reference(model, x):
    with torch.no_grad(), fake_quantized(model):
        return model(x)


def assert_int8_close(out, ref):
    error = (out - ref).abs().max().item()
    assert error <= INT8_TOLERANCE * ref.abs().max().item(), (error, ref.abs().max().item())


def assert_qdq_graph_close(out, ref):
    """The Q/DQ graph computes what the fake-quant model computes: equal to 1e-4 except where an
    intermediate lands on a rounding boundary (ONNX Runtime divides by the scale, fake-quant
    multiplies by its inverse), which moves that value by one code: within the int8 tolerance."""
    error = (out - ref).abs()
    assert error.median().item() <= 1e-5, error.median().item()
    assert_int8_close(out, ref)


# ------------------------------------------------------------------------------------------- PTQ


def test_calibrate_snaps_weights_folds_bn_and_records_ranges(ptq_cnn, cnn_batches):
    specs = get_qparams(ptq_cnn)
    assert sorted(specs) == ["0", "3", "8"]
    assert specs["0"].bn == "1" and specs["3"].bn == "4" and specs["8"].bn is None
    for name, spec in specs.items():
        weight = ptq_cnn.get_submodule(name).weight.detach()
        grid = weight * batchnorm_fold_factor(ptq_cnn.get_submodule(spec.bn)).view(-1, 1, 1, 1) if spec.bn else weight
        codes = grid / spec.weight_scale.view((-1,) + (1,) * (grid.dim() - 1))
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert codes.abs().max() <= 127.001
        assert (weight == 0).float().mean() >= 0.49  # pruning zeros survive snapping
    lo = min(float(b.min()) for b in cnn_batches)
    first = specs["0"]
    assert first.activation_bits == 8
    assert abs((0 - first.input_zero_point) * first.input_scale - lo) <= first.input_scale


def test_calibrate_weight_only_and_bad_arguments():
    model = make_mlp().eval()
    specs = get_qparams(calibrate(model, [torch.randn(4, 32)], weight_bits=4, activation_bits=None))
    assert all(spec.weight_only and spec.weight_bits == 4 for spec in specs.values())
    with pytest.raises(ValueError, match="weight_bits"):
        calibrate(make_mlp(), [torch.randn(4, 32)], weight_bits=9)
    with pytest.raises(ValueError, match="activation_bits"):
        calibrate(make_mlp(), [torch.randn(4, 32)], activation_bits=4)
    untouched = make_mlp()
    before = copy.deepcopy(untouched.state_dict())
    with pytest.raises(ValueError, match="batches"):
        calibrate(untouched, [])
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())


def test_quantized_copy_computes_the_fake_quant_model(ptq_cnn, cnn_batches):
    x = cnn_batches[0]
    with torch.no_grad():
        out = quantized_copy(ptq_cnn)(x)
    assert torch.allclose(out, reference(ptq_cnn, x), atol=1e-4)


# ------------------------------------------------------------------------------------------- ONNX


def test_export_onnx_has_int8_weights_and_learned_activation_qparams(ptq_cnn, cnn_batches, tmp_path):
    path = export_onnx(ptq_cnn, example_inputs=cnn_batches[0][:1], path=tmp_path / "m.onnx")
    graph = onnx.load(path).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("QuantizeLinear") == 3 and ops.count("DequantizeLinear") == 6
    assert "BatchNormalization" not in ops  # folded into the convs
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"}
    values = {**inits, **consts}
    weight_codes = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_codes) == 3 and all(codes.dtype == np.int8 for codes in weight_codes)
    specs = get_qparams(ptq_cnn)
    first_codes = quantize_weight(
        ptq_cnn[0].weight.detach() * batchnorm_fold_factor(ptq_cnn[1]).view(-1, 1, 1, 1), specs["0"]
    ).numpy()
    assert any(codes.shape == first_codes.shape and (codes == first_codes).all() for codes in weight_codes)
    assert all((codes == 0).mean() >= 0.45 for codes in weight_codes)  # pruned zeros stay zero
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert graph.input[0].name == quantizers[0].input[0]
    scale, zero_point = values[quantizers[0].input[1]], values[quantizers[0].input[2]]
    assert float(scale) == pytest.approx(specs["0"].input_scale, rel=1e-6)
    assert int(zero_point) == specs["0"].input_zero_point and zero_point.dtype == np.uint8


@pytest.mark.parametrize("optimization", ["disabled", "all"])
def test_export_onnx_runs_in_onnxruntime_and_matches(cnn_batches, tmp_path, optimization):
    torch.manual_seed(1)
    # 7-bit weights: ORT's fused u8 x s8 kernels cannot saturate on CPUs without VNNI
    model = calibrate(randomize_bn(make_cnn()).eval(), cnn_batches, weight_bits=7)
    path = export_onnx(model, example_inputs=cnn_batches[0], path=tmp_path / "m.onnx")
    options = ort.SessionOptions()
    if optimization == "disabled":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 8, 8)  # another batch size: the batch axis is dynamic
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    ref = reference(model, x)
    if optimization == "disabled":  # the graph computes exactly the fake-quant model
        assert torch.allclose(out, ref, atol=1e-4)
    assert_int8_close(out, ref)


# ------------------------------------------------------------------------------------------- int8


def test_to_int8_onnxruntime_matches_fake_quant_and_keeps_zeros(ptq_cnn, cnn_batches):
    int8_model = to_int8(ptq_cnn, example_inputs=cnn_batches[0][:1])
    for x in cnn_batches:
        assert_int8_close(int8_model(x), reference(ptq_cnn, x))
    graph = onnx.load_from_string(int8_model.onnx_model).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            zero_point = inits[node.input[2]].astype(np.int32)
            codes = inits[node.input[0]].astype(np.int32) - zero_point.reshape((-1,) + (1,) * (inits[node.input[0]].ndim - 1))
            assert (codes == 0).mean() >= 0.45
    clone = pickle.loads(pickle.dumps(int8_model))
    assert torch.equal(clone(cnn_batches[0]), int8_model(cnn_batches[0]))


def test_to_int8_weight_only_layers_and_mlp(tmp_path):
    torch.manual_seed(2)
    batches = [torch.randn(16, 32) for _ in range(2)]
    model = calibrate(prune_half(make_mlp()).eval(), batches, modules=["0", "2"])
    calibrate(model, batches, activation_bits=None, modules=["4"])
    assert get_qparams(model)["4"].weight_only and not get_qparams(model)["0"].weight_only
    int8_model = to_int8(model, example_inputs=batches[0])
    assert_int8_close(int8_model(batches[1]), reference(model, batches[1]))
    # layers 0 and 2 have equal-shaped zero points, which the exporter shares through an Identity node
    graph = onnx.load(export_onnx(model, example_inputs=batches[0], path=tmp_path / "mlp.onnx")).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == 2 and not any(n.input[0] in inits for n in quantizers)
    weights = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert [w.dtype for w in weights] == [np.int8] * 3
    assert not any(v.dtype == np.float32 and v.ndim == 2 for v in inits.values())  # no float weight left


@pytest.mark.parametrize("weight_dtype", ["int8", "uint8"])
def test_to_int8_onnxruntime_weight_dtype_override(weight_dtype):
    torch.manual_seed(6)
    batches = [torch.randn(16, 32) for _ in range(2)]
    model = calibrate(make_mlp().eval(), batches, weight_bits=7)  # 7 bits: exact even with int8 on AVX2
    int8_model = to_int8(model, example_inputs=batches[0], weight_dtype=weight_dtype)
    assert_int8_close(int8_model(batches[1]), reference(model, batches[1]))
    graph = onnx.load_from_string(int8_model.onnx_model).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    weights = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert {w.dtype for w in weights} == {np.dtype(weight_dtype)}


@pytest.mark.parametrize("weight_dtype", ["int8", "uint8"])
def test_classifier_head_runs_as_integer_matmul(weight_dtype):
    """A Gemm whose output is the model's output is not fused by ONNX Runtime (it would run in fp32
    on weights dequantized at every call): it is exported as MatMulInteger -> Cast -> Mul -> Add."""
    torch.manual_seed(8)
    batches = [torch.randn(16, 32) for _ in range(2)]
    model = calibrate(make_mlp().eval(), batches, weight_bits=7)
    int8_model = to_int8(model, example_inputs=batches[0], weight_dtype=weight_dtype)
    ops = [node.op_type for node in onnx.load_from_string(int8_model.onnx_model).graph.node]
    assert ops.count("Gemm") == 2 and ops[-4:] == ["MatMulInteger", "Cast", "Mul", "Add"], ops
    assert_int8_close(int8_model(batches[1]), reference(model, batches[1]))
    single = batches[1][:1]
    assert_int8_close(int8_model(single), reference(model, single))


def test_layers_ort_leaves_in_float_get_constant_weights_with_unchanged_outputs(monkeypatch):
    """The last conv feeds a float global pooling, so ONNX Runtime cannot fuse it into QLinearConv:
    its weight is dequantized once at conversion (ORT then prepacks it) instead of at every call."""
    import compress_callbacks.export.int8 as int8_path

    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    model = calibrate(model.eval(), batches, weight_bits=7)
    with pytest.warns(UserWarning, match=r"runs 1 quantized layer\(s\) in float .*calibration="):
        int8_model = to_int8(model, example_inputs=batches[0])
    graph = onnx.load_from_string(int8_model.onnx_model).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    weight_kinds = [inits[c.input[1]].dtype if c.input[1] in inits else "from DequantizeLinear" for c in convs]
    assert weight_kinds == ["from DequantizeLinear", np.float32], weight_kinds  # the first fuses; the last cannot
    monkeypatch.setattr(int8_path, "_constant_weights", lambda onnx_model, layers: None)
    unchanged = to_int8(model, example_inputs=batches[0])
    assert torch.equal(int8_model(batches[1]), unchanged(batches[1]))
    assert_int8_close(int8_model(batches[1]), reference(model, batches[1]))
    monkeypatch.undo()
    # weight-only layers (float inputs) keep their int8 weights: memory is why one quantizes them
    weight_only = calibrate(make_mlp().eval(), [torch.randn(8, 32)], activation_bits=None)
    graph = onnx.load_from_string(to_int8(weight_only, example_inputs=torch.randn(8, 32)).onnx_model).graph
    float_weights = [i.name for i in graph.initializer if numpy_helper.to_array(i).dtype == np.float32 and i.dims and len(i.dims) == 2]
    assert float_weights == [], float_weights


def _load_benchmark(name: str):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_resnet() -> nn.Module:
    """The benchmark's ResNet-style CNN at width 4: stem, two residual blocks, MaxPool, a widening
    conv, two more blocks, global pooling, classifier (10 convs)."""
    return _load_benchmark("int8_inference").make_resnet(width=4)


def ort_optimized_ops(onnx_bytes: bytes, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def test_calibration_quantizes_the_outputs_ort_would_leave_float(tmp_path):
    """In a residual CNN each block's second conv feeds an Add, and the stem's and the widening conv's
    Relu outputs feed both a conv's quantizer and a skip Add: ONNX Runtime runs those six convs in float. ``calibration``
    gives the conv outputs a uint8 range observed on it and lets the Adds read the skip tensor's
    existing Q/DQ copy: every conv then runs as QLinearConv, the Adds as QLinearAdd, and the outputs
    stay within tolerance."""
    torch.manual_seed(11)
    model = randomize_bn(make_resnet()).eval()
    batches = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    model = calibrate(model, batches, weight_bits=7)
    x = torch.randn(8, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"runs 6 quantized layer\(s\) in float"):
        plain = to_int8(model, example_inputs=x[:1])
    assert ort_optimized_ops(plain.onnx_model, tmp_path).count("QLinearConv") == 4  # each block's first conv

    calibrated = to_int8(model, example_inputs=x[:1], calibration=iter(batches))  # a one-pass iterable
    ops = ort_optimized_ops(calibrated.onnx_model, tmp_path)
    assert ops.count("QLinearConv") == 10 and "Conv" not in ops and "FusedConv" not in ops, ops
    assert ops.count("QLinearAdd") >= 3, ops  # all but the last, whose output feeds the float pooling
    assert_int8_close(calibrated(x), reference(model, x))
    # export_onnx writes the same calibrated points into the file
    path = export_onnx(model, example_inputs=x[:1], path=tmp_path / "calibrated.onnx", calibration=batches)
    file_nodes = onnx.load(path).graph.node
    assert len([n for n in file_nodes if n.op_type == "QuantizeLinear" and n.name.endswith("_output_quantized")]) == 4
    assert "MatMulInteger" not in [n.op_type for n in file_nodes]  # the session-only head rewrite stays out
    assert ort_optimized_ops(open(path, "rb").read(), tmp_path).count("QLinearConv") == 10
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert_int8_close(torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0]), calibrated(x))
    # each point's range is what the calibration batches produced there (the fake-quant model)
    graph = onnx.load_from_string(calibrated.onnx_model).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    points = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.name.endswith("_output_quantized")]
    assert len(points) == 4  # the blocks' second convs; the skip rerouting fixes the stem and widening conv
    first = min(points, key=lambda n: list(graph.node).index(n))  # the first block's second conv (+ its BN)
    seen = []
    hook = model[3].bn2.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad(), fake_quantized(model):
        for b in batches:
            model(b)
    hook.remove()
    low, high = min(float(t.min()) for t in seen), max(float(t.max()) for t in seen)
    expected_scale = (max(high, 0.0) - min(low, 0.0)) / 255
    assert float(inits[first.input[1]]) == pytest.approx(expected_scale, rel=0.01)
    assert abs(int(inits[first.input[2]]) - round(-min(low, 0.0) / expected_scale)) <= 1


def test_calibration_quantizes_after_the_relu_before_a_global_pooling(tmp_path):
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    model = calibrate(model.eval(), batches, weight_bits=7)
    int8_model = to_int8(model, example_inputs=batches[0], calibration=batches)
    ops = ort_optimized_ops(int8_model.onnx_model, tmp_path)
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops and "FusedConv" not in ops, ops
    graph = onnx.load_from_string(int8_model.onnx_model).graph
    inits = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    (point,) = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.name.endswith("_output_quantized")]
    assert int(inits[point.input[2]]) == 0  # after the Relu: [0, max]
    with torch.no_grad(), fake_quantized(model):
        high = max(float(model[:4](b).max()) for b in batches)
    assert float(inits[point.input[1]]) * 255 == pytest.approx(high, rel=0.01)
    x = torch.randn(4, 3, 8, 8)
    assert_int8_close(int8_model(x), reference(model, x))
    # a conv whose output is the model's output keeps float outputs: calibration leaves it, and says so
    head_conv = calibrate(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval(), batches, weight_bits=7)
    with pytest.warns(UserWarning, match=r"after calibration ONNX Runtime still runs 1 quantized layer"):
        still_float = to_int8(head_conv, example_inputs=batches[0], calibration=batches)
    assert_int8_close(still_float(x), reference(head_conv, x))


def test_calibration_bad_input_fails_before_anything_is_built():
    torch.manual_seed(12)
    batches = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    model = calibrate(randomize_bn(make_resnet()).eval(), batches, weight_bits=7)
    x = batches[0][:1]
    with pytest.raises(ValueError, match="`calibration` is for backend='onnxruntime'"):
        to_int8(model, example_inputs=x, backend="inductor", calibration=batches)
    with pytest.raises(TypeError, match="`calibration` must be an iterable of batches"):
        to_int8(model, example_inputs=x, calibration=batches[0])
    with pytest.raises(TypeError, match="`calibration` must be an iterable of batches"):
        export_onnx(model, example_inputs=x, path="never_written.onnx", calibration=3)
    assert not os.path.exists("never_written.onnx")
    with pytest.raises(ValueError, match="at least one batch"):
        to_int8(model, example_inputs=x, calibration=[])
    with pytest.raises(ValueError, match="each batch must hold the model's 1 input"):  # a loader's (x, y) pairs
        to_int8(model, example_inputs=x, calibration=[(b, torch.zeros(8)) for b in batches])


def test_to_int8_still_converts_when_ort_graph_cannot_be_inspected(monkeypatch):
    import onnxruntime

    torch.manual_seed(10)
    batches = [torch.randn(8, 32) for _ in range(2)]
    model = calibrate(make_mlp().eval(), batches, weight_bits=7)
    real_session = onnxruntime.InferenceSession

    def refuse_to_write(model_bytes, options=None, *args, **kwargs):
        if options is not None and options.optimized_model_filepath:
            raise RuntimeError("read-only temp dir")
        return real_session(model_bytes, options, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse_to_write)
    with pytest.warns(UserWarning, match="could not inspect ONNX Runtime's optimized graph"):
        int8_model = to_int8(model, example_inputs=batches[0])
    assert_int8_close(int8_model(batches[1]), reference(model, batches[1]))


def test_to_int8_inductor_matches_fake_quant():
    torch.manual_seed(3)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))
    model = calibrate(randomize_bn(model).eval(), batches, weight_bits=7)
    int8_model = to_int8(model, example_inputs=batches[0], backend="inductor")
    assert_int8_close(int8_model(batches[1]), reference(model, batches[1]))


def test_to_int8_inductor_models_do_not_share_one_dynamo_cache():
    # Compiling each converted module directly filed them all under one shared code object: past
    # Dynamo's recompile limit, later models (and the user's own compiled modules) silently ran eager.
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(4)
    x = torch.randn(4, 32)
    first, second = (to_int8(calibrate(make_mlp().eval(), [x], weight_bits=7), example_inputs=x, backend="inductor")
                     for _ in range(2))
    assert first._forward is not second._forward
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 1}):
        third = to_int8(calibrate(make_mlp().eval(), [x], weight_bits=7), example_inputs=x, backend="inductor")
        compiled_before = counters["stats"]["unique_graphs"]
        fourth = to_int8(calibrate(make_mlp().eval(), [x], weight_bits=7), example_inputs=x, backend="inductor")
        assert counters["stats"]["unique_graphs"] == compiled_before + 1  # compiled, not left to eager
    for model in (first, second, third, fourth):
        assert model(x).shape == (4, 5)


def test_export_rejects_models_without_specs_and_bad_arguments(tmp_path):
    plain = make_mlp().eval()
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match="calibrate"):
        to_int8(plain, example_inputs=x)
    with pytest.raises(ValueError, match="calibrate"):
        export_onnx(plain, example_inputs=x, path=tmp_path / "m.onnx")
    model = calibrate(make_mlp().eval(), [x])
    with pytest.raises(ValueError, match="backend"):
        to_int8(model, example_inputs=x, backend="tensorrt")
    with pytest.raises(ValueError, match="weight_dtype"):
        export_onnx(model, example_inputs=x, path=tmp_path / "m.onnx", weight_dtype="int4")
    with pytest.raises(ValueError, match="weight_dtype"):
        to_int8(model, example_inputs=x, backend="inductor", weight_dtype="int8")
    with pytest.raises(TypeError, match="example_inputs"):
        to_int8(model, example_inputs=[1, 2])
    assert not os.path.exists(tmp_path / "m.onnx")


# ------------------------------------------------------------------------------------------- files


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def test_save_load_compressed_round_trip(ptq_cnn, cnn_batches, tmp_path):
    path = tmp_path / "m.ccz"
    save_compressed(ptq_cnn, path)
    torch.load(path, weights_only=True)  # a safe file
    fresh = load_compressed(path, make_cnn())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ptq_cnn.state_dict().values()))
    fresh.eval()
    assert torch.equal(fresh(cnn_batches[0]), ptq_cnn(cnn_batches[0]))
    for name, spec in get_qparams(ptq_cnn).items():
        loaded = get_qparams(fresh)[name]
        assert isinstance(loaded, LayerQuantSpec) and torch.equal(loaded.weight_scale, spec.weight_scale)
        assert (loaded.input_scale, loaded.input_zero_point, loaded.bn) == (spec.input_scale, spec.input_zero_point, spec.bn)
    torch.save({"not": "ours"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="path"):
        load_compressed(tmp_path / "other.pt", make_cnn())


def test_compressed_sizes_against_fp32_state_dict(tmp_path):
    torch.manual_seed(4)
    batches = [torch.randn(8, 256)]
    fp32 = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
    dense_bytes = _state_dict_bytes(fp32)

    def size(model, name):
        save_compressed(model, tmp_path / name)
        return os.path.getsize(tmp_path / name) / dense_bytes

    dense_int8 = size(calibrate(copy.deepcopy(fp32), batches), "dense_int8.ccz")
    sparse = copy.deepcopy(fp32)
    with torch.no_grad():
        for module in sparse:
            if isinstance(module, nn.Linear):
                threshold = module.weight.abs().flatten().kthvalue(int(0.9 * module.weight.numel())).values
                module.weight.mul_((module.weight.abs() > threshold).float())
    sparse_fp32 = size(sparse, "sparse_fp32.ccz")
    sparse_int8 = size(calibrate(copy.deepcopy(sparse), batches), "sparse_int8.ccz")
    assert dense_int8 <= 0.27
    assert sparse_int8 <= 0.08
    assert sparse_fp32 <= 0.2
    reloaded = load_compressed(tmp_path / "sparse_fp32.ccz", nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), sparse.state_dict().values()))


# ------------------------------------------------------------------------------------------- QAT end to end


def qat_train(model: nn.Module, batches, *, prune: bool):
    """A few QAT (+ GMP) steps; returns the finalized model and the fake-quant model's eval outputs."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    callbacks = [QuantizationAwareTraining(start_step=2)]
    if prune:
        callbacks.append(GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=4, update_every=1))
    manager = CompressionManager(*callbacks)
    manager.attach(model, optimizer)
    for x in batches * 3:
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        simulated = [model(x) for x in batches]
    return manager.finalize(model), simulated


@pytest.mark.parametrize("prune", [False, True])
def test_qat_model_exports_to_int8_onnx_and_compact_file(cnn_batches, tmp_path, prune):
    torch.manual_seed(5)
    finalized, simulated = qat_train(randomize_bn(make_cnn()), cnn_batches, prune=prune)
    specs = get_qparams(finalized)
    assert specs["0"].bn == "1" and specs["3"].bn == "4"
    for x, ref in zip(cnn_batches, simulated):  # the contract: finalized + specs == fake-quant model
        assert torch.allclose(reference(finalized, x), ref, atol=1e-5)
    int8_model = to_int8(finalized, example_inputs=cnn_batches[0][:1])
    path = export_onnx(finalized, example_inputs=cnn_batches[0][:1], path=tmp_path / "qat.onnx")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for x, ref in zip(cnn_batches, simulated):
        assert_int8_close(int8_model(x), ref)
        onnx_out = torch.from_numpy(session.run(None, {"input_0": x.numpy()})[0])
        assert_qdq_graph_close(onnx_out, ref)
    save_compressed(finalized, tmp_path / "qat.ccz")
    fresh = load_compressed(tmp_path / "qat.ccz", make_cnn()).eval()
    for key, value in finalized.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert torch.equal(fresh(cnn_batches[0]), finalized(cnn_batches[0]))
    assert sorted(get_qparams(fresh)) == sorted(specs)
    if prune:
        zeros = [(m.weight == 0).float().mean().item() for m in fresh.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert min(zeros) >= 0.5
