"""Take a finalized (QAT) or calibrated (PTQ) model further: int8 for CPU, ONNX with Q/DQ, compact files.

A finalized model is a plain float ``nn.Module`` whose quantized layers carry their specs in
``model.compress_qparams`` (see :mod:`compress_callbacks.quantization.spec`). Everything here reads
those specs; nothing is re-estimated, so the int8 model computes what training simulated.

>>> import os, tempfile, torch, torch.nn as nn
>>> from compress_callbacks.quantization.ptq import calibrate, fake_quantized
>>> torch.manual_seed(0) and None
>>> model = calibrate(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), [torch.randn(64, 16)])
>>> x = torch.randn(8, 16)
>>> with torch.no_grad(), fake_quantized(model):
...     reference = model(x)
>>> int8_model = to_int8(model, example_inputs=x)
>>> bool((int8_model(x) - reference).abs().max() <= 0.01 * reference.abs().max())
True
>>> path = os.path.join(tempfile.mkdtemp(), "model.ccz")
>>> save_compressed(model, path)
>>> fresh = load_compressed(path, nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
>>> torch.equal(fresh(x), model(x)), sorted(fresh.compress_qparams)
(True, ['0', '2'])
"""

from __future__ import annotations

import copy
import io
import os
import types
import warnings
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantization import fake_quant as FQ
from .quantization.grid import batchnorm_fold_factor as bn_fold_factor, folded_conv_bias
from .quantization.spec import (
    QPARAMS_ATTR,
    LayerQuantSpec,
    get_qparams,
    qparams_from_state,
    qparams_to_state,
    quantize_weight,
    dequantized_weight,
    set_qparams,
)
from .targets import unwrap_model

__all__ = [
    "to_int8",
    "export_onnx",
    "save_compressed",
    "load_compressed",
    "OnnxRuntimeModule",
    "InductorInt8Module",
    "Int8Layer",
    "FakeQuantLayer",
    "quantized_copy",
    "cpu_has_vnni",
]

ONNX_OPSET = 17


# ---------------------------------------------------------------------------------------------
# the quantized graph in float: BN folded, weights and inputs fake-quantized with the specs


class FakeQuantLayer(nn.Module):
    """A Linear/Conv whose weight and input pass through fake-quant with fixed (learned) qparams.

    Traced by ``torch.onnx.export`` this becomes QuantizeLinear/DequantizeLinear around the layer.
    The weight it holds is already on its grid (``codes * scale``), so fake-quant is exact on it.

    >>> layer = nn.Linear(2, 1, bias=False)
    >>> layer.weight.data = torch.tensor([[0.5, -0.26]])
    >>> spec = LayerQuantSpec(weight_bits=2, weight_scale=torch.tensor([0.5]), activation_bits=8,
    ...                       input_scale=0.1, input_zero_point=0)
    >>> FakeQuantLayer(layer, spec)(torch.tensor([[1.04, 1.0]])).tolist()   # x -> [1.0, 1.0], w -> [0.5, -0.5]
    [[0.0]]
    """

    def __init__(self, layer: nn.Module, spec: LayerQuantSpec, bias: torch.Tensor | None = None):
        super().__init__()
        self.layer = layer
        self.spec = spec
        weight = layer.weight.detach()
        codes = quantize_weight(weight, spec)
        self.register_buffer("weight_scale", spec.weight_scale.to(weight.device, torch.float32).clone())
        self.register_buffer("weight_zero_point", torch.zeros(codes.shape[0], dtype=torch.int32, device=weight.device))
        with torch.no_grad():
            layer.weight.copy_(dequantized_weight(codes, spec).to(weight.dtype))
            if bias is not None:
                if layer.bias is None:
                    layer.bias = nn.Parameter(bias.to(weight.dtype))
                else:
                    layer.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if not spec.weight_only:
            x = torch.fake_quantize_per_tensor_affine(
                x, spec.input_scale, spec.input_zero_point, spec.activation_qmin, spec.activation_qmax
            )
        weight = torch.fake_quantize_per_channel_affine(
            self.layer.weight, self.weight_scale, self.weight_zero_point, 0, -128, 127
        )
        if isinstance(self.layer, nn.Linear):
            return F.linear(x, weight, self.layer.bias)
        return self.layer._conv_forward(x, weight, self.layer.bias)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _require_qparams(model: nn.Module, function: str) -> dict[str, LayerQuantSpec]:
    qparams = get_qparams(unwrap_model(model))
    if not qparams:
        raise ValueError(
            f"`model` has no quantization specs (`compress_qparams`): {function} needs a model finalized "
            "after QuantizationAwareTraining, or one calibrated with "
            "compress_callbacks.quantization.ptq.calibrate(model, batches)"
        )
    return qparams


def quantized_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy with BatchNorms folded into their convs and every spec'd layer a ``FakeQuantLayer``.

    Computes the same as ``fake_quantized(model)`` (up to float rounding of the BN fold).
    """
    qparams = _require_qparams(model, "quantized_copy")
    root = copy.deepcopy(unwrap_model(model)).eval()
    root.__dict__.pop(QPARAMS_ATTR, None)
    for name, spec in qparams.items():
        layer = root.get_submodule(name)
        bias = None
        if spec.bn is not None:
            bn = root.get_submodule(spec.bn)
            factor = bn_fold_factor(bn).to(layer.weight.device)
            with torch.no_grad():
                layer.weight.mul_(factor.reshape((-1,) + (1,) * (layer.weight.dim() - 1)).to(layer.weight.dtype))
            bias = folded_conv_bias(layer, bn)
            _set_submodule(root, spec.bn, nn.Identity())
        _set_submodule(root, name, FakeQuantLayer(layer, spec, bias))
    return root


# ---------------------------------------------------------------------------------------------
# ONNX


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError(f"`example_inputs` must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _constant_values(graph):
    """``value(name)``: the numpy array of an initializer or Constant output (through Identity), else None."""
    from onnx import numpy_helper

    initializers = {init.name: init for init in graph.initializer}
    constants = {
        node.output[0]: node.attribute[0].t
        for node in graph.node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
    }
    aliases = {node.output[0]: node.input[0] for node in graph.node if node.op_type == "Identity"}

    def value(name):
        while name in aliases:  # the exporter shares equal initializers through Identity nodes
            name = aliases[name]
        tensor = initializers[name] if name in initializers else constants.get(name)
        return numpy_helper.to_array(tensor) if tensor is not None else None

    return value


def _scale_shape(node, ndim: int, scale) -> list[int]:
    """Shape that broadcasts a (De)QuantizeLinear ``scale`` over an ``ndim`` tensor (per ``axis`` if 1-D)."""
    shape = [1] * ndim
    if scale.ndim == 1:
        shape[next((a.i for a in node.attribute if a.name == "axis"), 1)] = -1
    return shape


def _fold_weight_quantizers(onnx_model, weight_dtype: str = "int8") -> None:
    """Replace ``QuantizeLinear(float initializer)`` by an integer initializer feeding its DequantizeLinear.

    ``weight_dtype="uint8"`` stores the same grid shifted by 128 (codes + 128, zero point 128).
    """
    import numpy as np
    from onnx import numpy_helper

    graph = onnx_model.graph
    initializers = {init.name for init in graph.initializer}
    value = _constant_values(graph)
    removed = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers:
            continue
        weight, scale, zero_point = value(node.input[0]), value(node.input[1]), value(node.input[2])
        if scale is None or zero_point is None:
            continue
        shape = _scale_shape(node, weight.ndim, scale)
        info = np.iinfo(zero_point.dtype)
        codes = np.clip(np.rint(weight / scale.reshape(shape)) + zero_point.reshape(shape), info.min, info.max)
        name = node.input[0] + "_quantized"
        if weight_dtype == "uint8" and zero_point.dtype == np.int8:
            codes, zero_point = codes + 128, zero_point.astype(np.int32) + 128
        dtype = np.uint8 if weight_dtype == "uint8" else zero_point.dtype
        graph.initializer.append(numpy_helper.from_array(codes.astype(dtype), name))
        zp_name = name + "_zero_point"
        graph.initializer.append(numpy_helper.from_array(np.asarray(zero_point).astype(dtype), zp_name))
        for consumer in graph.node:
            if consumer.op_type == "DequantizeLinear" and consumer.input[0] == node.output[0]:
                consumer.input[0] = name
                consumer.input[2] = zp_name
        removed.append(node)
    for node in removed:
        graph.node.remove(node)
    _drop_unused(graph)


def _integer_heads(onnx_model) -> None:
    """Rewrite a Q/DQ ``Gemm`` that produces a graph output (a classifier head) as ``MatMulInteger``.

    ONNX Runtime fuses ``DQ -> Gemm (-> Relu) -> Q`` into QGemm, but a Gemm whose output stays float
    ran in fp32 on weights dequantized at every call. As ``MatMulInteger`` (uint8 activations,
    integer weights, int32 sums) ``-> Cast -> Mul(input scale * weight scale per column) -> Add(bias)``
    it computes the fake-quant model's result with exact integer sums. (Not for convolutions: on the
    benchmark CNN, ONNX Runtime's ``ConvInteger`` took 7.4 ms for the last conv where fp32 took 2.7
    and QLinearConv 0.35.)
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    value = _constant_values(graph)
    producer = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}

    for node in list(graph.node):
        if node.op_type != "Gemm" or node.output[0] not in outputs:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (attrs.get("transA", 0), attrs.get("transB", 0), attrs.get("alpha", 1.0), attrs.get("beta", 1.0)) != (0, 1, 1.0, 1.0):
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        if len(dq_x.input) < 3 or len(dq_w.input) < 3:
            continue
        x_scale, x_zero = value(dq_x.input[1]), value(dq_x.input[2])
        codes, w_scale, w_zero = value(dq_w.input[0]), value(dq_w.input[1]), value(dq_w.input[2])
        bias = value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if (x_scale is None or x_zero is None or x_scale.size != 1 or x_zero.dtype != np.uint8 or codes is None
                or codes.ndim != 2 or w_scale is None or w_zero is None or np.unique(w_zero).size != 1
                or (len(node.input) > 2 and node.input[2] and bias is None)):
            continue
        name, columns = node.name or node.output[0], codes.shape[0]
        scale = np.float32(x_scale.reshape(())) * np.broadcast_to(np.asarray(w_scale, np.float32).reshape(-1), (columns,))
        graph.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(codes.T), f"{name}_weight_codes_t"),
            numpy_helper.from_array(np.asarray(w_zero.reshape(-1)[0], codes.dtype), f"{name}_weight_zero_point_scalar"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_output_scale"),
        ])
        new = [
            helper.make_node("MatMulInteger", [dq_x.input[0], f"{name}_weight_codes_t", dq_x.input[2],
                                               f"{name}_weight_zero_point_scalar"], [f"{name}_int32"], name=f"{name}_integer"),
            helper.make_node("Cast", [f"{name}_int32"], [f"{name}_sum"], to=1),
            helper.make_node("Mul", [f"{name}_sum", f"{name}_output_scale"],
                             [f"{name}_scaled" if bias is not None else node.output[0]]),
        ]
        if bias is not None:
            graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), f"{name}_bias_b"))
            new.append(helper.make_node("Add", [f"{name}_scaled", f"{name}_bias_b"], [node.output[0]]))
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, added in enumerate(new):
            graph.node.insert(position + offset, added)
    _drop_unused(graph)


FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def _ort_optimized_graph(onnx_model):
    """ONNX Runtime's optimized graph of ``onnx_model`` (a ``GraphProto``), or None if it cannot be had."""
    import tempfile

    import onnx
    import onnxruntime as ort

    try:
        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            options.log_severity_level = 3  # its warning about hardware-specific optimized files
            ort.InferenceSession(onnx_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return onnx.load(options.optimized_model_filepath).graph
    except Exception as error:  # callers only optimise: the model runs as it is without them
        warnings.warn(f"compress_callbacks.export: could not inspect ONNX Runtime's optimized graph ({type(error).__name__}: {error}); "
                      "the layers it computes in float are left as they are", stacklevel=4)
        return None


def _layers_ort_computes_float(onnx_model) -> list | None:
    """The Q/DQ layers (quantized input and weight) that ONNX Runtime runs in float, as graph nodes.

    A layer whose output is not quantized again (the last conv before a float global pooling, a conv
    feeding a residual Add) is not fused into QLinearConv / QGemm. Which layers those are is asked of
    ONNX Runtime itself: the names of the float convolutions / GEMMs in its optimized graph. Layers
    with float inputs (weight-only quantization) are not listed. None if ONNX Runtime cannot say.
    """
    optimized = _ort_optimized_graph(onnx_model)
    if optimized is None:
        return None
    float_names = {node.name for node in optimized.node if node.op_type in FLOAT_COMPUTE_OPS and node.name}
    producer = {out: node for node in onnx_model.graph.node for out in node.output}
    layers = []
    for node in onnx_model.graph.node:
        if node.name not in float_names or node.op_type not in FLOAT_COMPUTE_OPS or len(node.input) < 2:
            continue
        dq_weight, dq_input = producer.get(node.input[1]), producer.get(node.input[0])
        if dq_weight is None or dq_weight.op_type != "DequantizeLinear" or len(dq_weight.input) < 3:
            continue
        if dq_input is None or dq_input.op_type != "DequantizeLinear":
            continue  # weight-only layers keep int8 weights in memory: that is what they are for
        layers.append(node)
    return layers


def _constant_weights(onnx_model, layers) -> None:
    """Dequantize, once, the weights of ``layers`` (which ONNX Runtime computes in float).

    ONNX Runtime dequantizes a float layer's weight at every call and cannot prepack it (for the
    benchmark CNN's last conv, 3.5 of its 5 ms). Its ``DequantizeLinear(weight codes)`` becomes the
    float initializer it computes, bit for bit, so outputs do not change.
    """
    import numpy as np
    from onnx import numpy_helper

    graph = onnx_model.graph
    value = _constant_values(graph)
    producer = {out: node for node in graph.node for out in node.output}
    for node in layers:
        dq = producer[node.input[1]]
        codes, scale, zero = value(dq.input[0]), value(dq.input[1]), value(dq.input[2])
        if codes is None or scale is None or zero is None:
            continue
        shape = _scale_shape(dq, codes.ndim, scale)
        weight = (codes.astype(np.float32) - zero.astype(np.float32).reshape(shape)) * scale.astype(np.float32).reshape(shape)
        name = f"{dq.output[0]}_dequantized"
        graph.initializer.append(numpy_helper.from_array(weight.astype(np.float32), name))
        node.input[1] = name
    _drop_unused(graph)


def _output_points(graph, layers) -> dict[str, Any]:
    """For each layer, the tensor to quantize its output at: after its Relu if that is the only reader.

    Returns ``{tensor name: node producing it}``. Skipped: graph outputs, and tensors a learned
    ``QuantizeLinear`` already reads (a residual block's input: its other reader, the skip ``Add``, is
    what kept ONNX Runtime from fusing; ``_quantized_skip_inputs`` reroutes that reader instead).
    """
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    points = {}
    for node in layers:
        point, producer = node.output[0], node
        after = readers.get(point, [])
        if len(after) == 1 and after[0].op_type == "Relu" and point not in outputs:
            point, producer = after[0].output[0], after[0]
        already_quantized = any(reader.op_type == "QuantizeLinear" for reader in readers.get(point, []))
        if point not in outputs and readers.get(point) and not already_quantized:
            points[point] = producer
    return points


def _calibrated_ranges(onnx_model, names: list[str], batches) -> dict[str, tuple[float, float]]:
    """Min / max of the tensors ``names`` over ``batches``, run through ONNX Runtime (the Q/DQ graph)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(onnx_model)
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_names = [meta.name for meta in session.get_inputs()]
    ranges: dict[str, tuple[float, float]] = {}
    count = 0
    for batch in batches:
        inputs = _as_calibration_batch(batch, len(input_names))
        values = session.run(names, {n: t.detach().cpu().float().contiguous().numpy() for n, t in zip(input_names, inputs)})
        for name, array in zip(names, values):
            low, high = float(array.min()), float(array.max())
            old = ranges.get(name, (low, high))
            ranges[name] = (min(old[0], low), max(old[1], high))
        count += 1
    if count == 0:
        raise ValueError("`calibration` must hold at least one batch of model inputs, got none")
    return ranges


def _check_calibration(calibration: Any) -> None:
    if calibration is not None and (isinstance(calibration, (torch.Tensor, dict, str, bytes)) or not hasattr(calibration, "__iter__")):
        raise TypeError(f"`calibration` must be an iterable of batches (e.g. a list of tensors), got a {type(calibration).__name__}")


def _quantize_float_layer_outputs(onnx_model, calibration: Iterable[Any] | None) -> list | None:
    """With ``calibration``, quantize the outputs of the layers ONNX Runtime would run in float.

    Returns the layers that still run in float (None if ONNX Runtime cannot say).
    """
    float_layers = _layers_ort_computes_float(onnx_model)
    if float_layers and calibration is not None:
        _quantize_outputs(onnx_model, float_layers, calibration)
        float_layers = _layers_ort_computes_float(onnx_model)
    return float_layers


def _as_calibration_batch(batch: Any, n_inputs: int) -> tuple:
    try:
        inputs = _as_tuple(batch)
    except TypeError:
        raise TypeError("`calibration` must be an iterable of model inputs (a tensor or a tuple of tensors per batch), "
                        f"got a batch of type {type(batch).__name__}") from None
    if len(inputs) != n_inputs:
        raise ValueError(f"`calibration`: each batch must hold the model's {n_inputs} input(s), got {len(inputs)}")
    return inputs


def _quantize_outputs(onnx_model, layers, batches) -> None:
    """Give the outputs of ``layers`` a calibrated uint8 Q/DQ pair, so ONNX Runtime runs them in int8.

    This is what ONNX Runtime's ``quantize_static`` does for tensors training never observed: per
    tensor, affine, over the min / max that ``batches`` produce (through the Q/DQ graph, i.e. the int8
    model's own inputs). A layer followed by its only reader, a Relu, is quantized after the Relu
    (range [0, max], zero point 0, which ONNX Runtime folds into QLinearConv / QGemm).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    points = _output_points(graph, layers)
    ranges = _calibrated_ranges(onnx_model, list(points), batches) if points else {}
    for point, producer in points.items():
        low, high = ranges[point]
        scale, zero_point = FQ.activation_qparams(torch.tensor(low), torch.tensor(high))
        q_name, dq_name = f"{point}_output_quantized", f"{point}_output_dequantized"
        graph.initializer.extend([
            numpy_helper.from_array(np.asarray(float(scale), np.float32), f"{point}_output_scale"),
            numpy_helper.from_array(np.asarray(int(zero_point), np.uint8), f"{point}_output_zero_point"),
        ])
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == point:
                    node.input[i] = dq_name
        position = list(graph.node).index(producer) + 1
        args = [f"{point}_output_scale", f"{point}_output_zero_point"]
        graph.node.insert(position, helper.make_node("QuantizeLinear", [point, *args], [q_name], name=q_name))
        graph.node.insert(position + 1, helper.make_node("DequantizeLinear", [q_name, *args], [dq_name], name=dq_name))
    _quantized_skip_inputs(graph)


def _quantized_skip_inputs(graph) -> None:
    """Let an ``Add`` with one dequantized input read its float input's dequantized copy, where one exists.

    In a residual block the skip tensor is also a quantized layer's input, so a ``Q -> DQ`` of it with
    its learned range is already in the graph; reading that (the value the layer sees) lets ONNX
    Runtime run the Add as ``QLinearAdd`` and fold the Relu before it into the next quantization.
    """
    producer = {out: node for node in graph.node for out in node.output}
    dequantized_copy = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            q = producer.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                dequantized_copy.setdefault(q.input[0], node.output[0])
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        kinds = [getattr(producer.get(name), "op_type", None) for name in node.input]
        for i in (0, 1):
            if kinds[i] != "DequantizeLinear" and kinds[1 - i] == "DequantizeLinear" and node.input[i] in dequantized_copy:
                node.input[i] = dequantized_copy[node.input[i]]


def _drop_unused(graph) -> None:
    """Remove nodes whose outputs nothing reads (repeatedly) and initializers no node reads."""
    while True:
        used = {inp for node in graph.node for inp in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.output and not any(out in used for out in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {inp for node in graph.node for inp in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            graph.initializer.remove(init)


def _onnx_model(model: nn.Module, example_inputs: Any, weight_dtype: str = "int8"):
    """The portable Q/DQ ONNX model (a ``ModelProto``) of a model with specs."""
    import onnx

    inputs = _as_tuple(example_inputs)
    graph_model = quantized_copy(model)
    with torch.no_grad():
        outputs = graph_model(*inputs)
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    input_names = [f"input_{i}" for i in range(len(inputs))]
    output_names = [f"output_{i}" for i in range(n_out)]
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated in favour of dynamo; it is the one
        warnings.simplefilter("ignore", DeprecationWarning)  # that maps fake-quant ops to Q/DQ directly
        torch.onnx.export(
            graph_model,
            inputs,
            buffer,
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes={name: {0: "batch"} for name in input_names + output_names},
            do_constant_folding=True,
        )
    onnx_model = onnx.load_from_string(buffer.getvalue())
    _fold_weight_quantizers(onnx_model, weight_dtype)
    return onnx_model


def export_onnx(
    model: nn.Module,
    *,
    example_inputs: Any,
    path: str | os.PathLike,
    weight_dtype: str = "int8",
    calibration: Iterable[Any] | None = None,
) -> str:
    """Write an ONNX file (opset 17) with QuantizeLinear/DequantizeLinear nodes and return its path.

    Weights are int8 initializers (per-channel scales) feeding DequantizeLinear; each quantized layer's
    input goes through QuantizeLinear/DequantizeLinear with its learned scale and zero point; a
    BatchNorm folded in training is folded into its conv. The batch dimension is dynamic. Uses the
    TorchScript exporter (``dynamo=False``): fast, and it maps the fake-quant ops to Q/DQ directly.
    ``weight_dtype="uint8"`` stores the same weight grid as uint8 codes + 128 (zero point 128), which
    x86 CPUs without VNNI run without u8 x s8 saturation. ``calibration`` (input batches; needs
    onnxruntime) adds calibrated Q/DQ on the outputs of layers that nothing else quantizes, as in
    ``to_int8``, so ONNX Runtime runs them in int8 too. Raises ``ValueError`` for a model without
    specs (quantize it with ``calibrate`` first).
    """
    if weight_dtype not in ("int8", "uint8"):
        raise ValueError(f"`weight_dtype` must be 'int8' or 'uint8', got {weight_dtype!r}")
    _check_calibration(calibration)
    _require_qparams(model, "export_onnx")
    onnx_model = _onnx_model(model, example_inputs, weight_dtype=weight_dtype)
    float_layers = _layers_ort_computes_float(onnx_model) if calibration is not None else None
    if float_layers:  # the file needs the calibrated points, not a second look at what stays float
        _quantize_outputs(onnx_model, float_layers, calibration)
    data = onnx_model.SerializeToString()
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(data)
    return path


class OnnxRuntimeModule(nn.Module):
    """An ONNX Runtime CPU session behind an ``nn.Module`` interface (tensors in, tensors out).

    Outputs come back on the device of the first input. Picklable: the session is rebuilt from the
    stored model bytes.

    >>> import onnx
    >>> from onnx import helper, TensorProto
    >>> graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    >>> module = OnnxRuntimeModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    >>> module(torch.tensor([-1.0, 2.0])).tolist()
    [0.0, 2.0]
    """

    def __init__(self, onnx_model: bytes, num_threads: int | None = None):
        super().__init__()
        self.onnx_model = onnx_model
        self.num_threads = num_threads
        self._session = None

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads = self.num_threads or torch.get_num_threads()
            self._session = ort.InferenceSession(self.onnx_model, options, providers=["CPUExecutionProvider"])
        return self._session

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_session"] = None
        return state

    def forward(self, *inputs: torch.Tensor):
        session = self.session
        feeds = {
            meta.name: x.detach().cpu().contiguous().numpy() for meta, x in zip(session.get_inputs(), inputs)
        }
        outputs = [torch.from_numpy(o).to(inputs[0].device) for o in session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


# ---------------------------------------------------------------------------------------------
# int8 model


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX512-VNNI / AVX-VNNI / AMX) int8 dot products (Linux: /proc/cpuinfo).

    Without VNNI, x86 u8 x s8 kernels (ONNX Runtime's and oneDNN's) add pairs of products in int16 and
    can saturate when activation codes near 255 meet weight codes near +-127.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_vnni", " avx_vnni", " amx_int8"))


class Int8Layer(nn.Module):
    """A Linear/Conv over int8 weight codes, in the quantize/dequantize form Inductor lowers to int8 kernels.

    The input is quantized/dequantized per tensor with the learned range (skipped when weight-only),
    the weight dequantized per channel from its int8 codes; under ``torch.compile`` with
    ``freezing=True`` Inductor's x86 passes fuse the pattern into oneDNN ``qlinear`` / ``qconv``.
    Eager, it computes the fake-quant layer (slowly).

    >>> spec = LayerQuantSpec(weight_bits=8, weight_scale=torch.tensor([0.01]))
    >>> layer = nn.Linear(2, 1, bias=False)
    >>> layer.weight.data = torch.tensor([[0.5, -0.25]])
    >>> int8 = Int8Layer(FakeQuantLayer(layer, spec))
    >>> int8.codes.tolist(), int8(torch.tensor([[2.0, 4.0]])).tolist()
    ([[50, -25]], [[0.0]])
    """

    def __init__(self, fake_quant: FakeQuantLayer):
        super().__init__()
        import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed ops)

        layer, spec = fake_quant.layer, fake_quant.spec
        self.spec = spec
        self.register_buffer("codes", quantize_weight(layer.weight.detach(), spec))
        self.register_buffer("weight_scale", fake_quant.weight_scale.clone())
        self.register_buffer("weight_zero_point", torch.zeros_like(fake_quant.weight_zero_point, dtype=torch.int64))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float(), requires_grad=False)
        self.linear = isinstance(layer, nn.Linear)
        self.conv = None
        if not self.linear:
            self.conv = copy.copy(layer)  # keeps stride/padding/... ; its weight is not used
            self.conv._parameters = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = torch.ops.quantized_decomposed
        spec = self.spec
        if not spec.weight_only:
            args = (spec.input_scale, spec.input_zero_point, spec.activation_qmin, spec.activation_qmax, torch.uint8)
            x = ops.dequantize_per_tensor.default(ops.quantize_per_tensor.default(x, *args), *args)
        weight = ops.dequantize_per_channel.default(
            self.codes, self.weight_scale, self.weight_zero_point, 0, -128, 127, torch.int8
        )
        if self.linear:
            return F.linear(x, weight, self.bias)
        return self.conv._conv_forward(x, weight, self.bias)


def _call_module(module: nn.Module, *inputs):
    return module(*inputs)


class InductorInt8Module(nn.Module):
    """``torch.compile`` (Inductor, ``freezing=True``) of a model made of ``Int8Layer``; runs under ``no_grad``.

    Compiles on the first call for each new input shape (tens of seconds), so build it with
    ``to_int8(..., backend="inductor")``, which makes that first call on ``example_inputs``.

    Each instance compiles its own copy of a small function. Compiling the module itself would file
    every converted model under code that all compiled modules share, and after
    ``torch._dynamo.config.recompile_limit`` (8) of them Dynamo silently runs the rest, and the
    user's own compiled modules, in eager mode (several times slower than fp32 here).

    >>> InductorInt8Module(nn.Identity()).graph_model
    Identity()
    """

    def __init__(self, graph_model: nn.Module):
        super().__init__()
        self.graph_model = graph_model
        code = _call_module.__code__.replace()  # a code object of this instance's own: its own Dynamo cache
        self._forward = torch.compile(types.FunctionType(code, _call_module.__globals__, "int8_forward"))

    def forward(self, *inputs):
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self._forward(self.graph_model, *inputs)


def _int8_layers_copy(model: nn.Module) -> nn.Module:
    root = quantized_copy(model)
    for name, module in list(root.named_modules()):
        if isinstance(module, FakeQuantLayer):
            _set_submodule(root, name, Int8Layer(module))
    return root


BACKENDS = ("onnxruntime", "inductor")


def to_int8(
    model: nn.Module,
    *,
    example_inputs: Any,
    backend: str = "onnxruntime",
    weight_dtype: str | None = None,
    calibration: Iterable[Any] | None = None,
) -> nn.Module:
    """A real int8 model for CPU inference that computes with the learned scales (static quantization).

    ``backend="onnxruntime"`` (default): the Q/DQ graph of ``export_onnx`` in an ONNX Runtime session
    wrapped as an ``nn.Module``; ORT's QDQ fusion runs int8 GEMM/conv kernels (QGemm, QLinearConv,
    ...), a Linear that produces the model's output (which ORT would run in fp32) runs as
    ``MatMulInteger``, and any other layer ORT leaves in float (its output is not quantized again,
    e.g. the last conv before a float global pooling) gets its weight dequantized once, not per call. Where the CPU lacks VNNI, weights are stored as uint8 (codes + 128, same grid) so the u8 x u8
    kernels cannot saturate; with VNNI they stay int8. ``weight_dtype="int8"`` / ``"uint8"`` overrides that
    choice (int8 is about 25% faster without VNNI, at the price of occasional saturation).

    Layers whose output nothing quantizes again (a conv feeding a residual ``Add`` or a float global
    pooling) have no int8 kernel in ONNX Runtime, which then runs them in float: a ResNet-style model
    can lose most of its speed-up that way. ``calibration`` (an iterable of input batches, e.g. a few
    hundred samples from the training data) gives those outputs a uint8 range observed on it, as ONNX
    Runtime's ``quantize_static`` does, so they run in int8 too; it adds one quantization step per such
    layer that training did not see. Without it ``to_int8`` warns, naming how many layers stay float.

    ``backend="inductor"``: the same quantize/dequantize pattern in PyTorch ops, compiled by Inductor
    with freezing into oneDNN ``qlinear``/``qconv`` (first call compiles: tens of seconds). Without VNNI,
    oneDNN's u8 x s8 kernels may saturate for 8-bit weights (use 7 bits or fewer to be exact).

    Every spec is used as is: weights per output channel (int8 codes), inputs per tensor with the
    learned scale / zero point; weight-only layers get int8 weights and float compute; layers without
    a spec and BatchNorms not folded in training stay float. Zeros from pruning stay zero (code 0).
    A model without specs raises ``ValueError``: quantize it first with
    ``compress_callbacks.quantization.ptq.calibrate(model, batches)`` (post-training, static).
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if weight_dtype not in (None, "int8", "uint8") or (weight_dtype is not None and backend != "onnxruntime"):
        raise ValueError(f"`weight_dtype` must be None, 'int8' or 'uint8' (onnxruntime backend only), got {weight_dtype!r}")
    if calibration is not None and backend != "onnxruntime":
        raise ValueError(f"`calibration` is for backend='onnxruntime' only (Inductor computes those layers in int8 "
                         f"with float outputs), got backend={backend!r}")
    _check_calibration(calibration)
    qparams = _require_qparams(model, "to_int8")
    inputs = _as_tuple(example_inputs)
    if backend == "onnxruntime":
        weight_dtype = weight_dtype or ("int8" if cpu_has_vnni() else "uint8")
        onnx_model = _onnx_model(model, inputs, weight_dtype=weight_dtype)
        _integer_heads(onnx_model)  # rewrites for the session only; export_onnx keeps portable Q/DQ
        float_layers = _quantize_float_layer_outputs(onnx_model, calibration)
        if float_layers and calibration is not None:
            warnings.warn(
                f"to_int8: after calibration ONNX Runtime still runs {len(float_layers)} quantized layer(s) in float "
                f"(e.g. a layer whose output is the model's output): {', '.join(node.name for node in float_layers[:4])}"
                f"{', ...' if len(float_layers) > 4 else ''}",
                stacklevel=2,
            )
        elif float_layers:
            warnings.warn(
                f"to_int8: ONNX Runtime runs {len(float_layers)} quantized layer(s) in float because nothing quantizes "
                f"their outputs (e.g. a conv feeding a residual Add or a global pooling): "
                f"{', '.join(node.name for node in float_layers[:4])}{', ...' if len(float_layers) > 4 else ''}. "
                "Pass `calibration=` (a few input batches) to quantize those outputs too, or use backend='inductor'",
                stacklevel=2,
            )
        if float_layers:
            _constant_weights(onnx_model, float_layers)
        return OnnxRuntimeModule(onnx_model.SerializeToString()).eval()
    if not cpu_has_vnni() and any(spec.weight_bits == 8 for spec in qparams.values()):
        warnings.warn(
            "to_int8(backend='inductor'): this CPU has no VNNI, so oneDNN's u8 x s8 kernels may saturate with "
            "8-bit weights and the outputs drift from the fake-quant model; backend='onnxruntime' is exact here",
            stacklevel=2,
        )
    int8_model = InductorInt8Module(_int8_layers_copy(model).eval()).eval()
    int8_model(*inputs)  # compile now, not on the user's first batch
    return int8_model


# ---------------------------------------------------------------------------------------------
# compact checkpoints

_FORMAT = "compress_callbacks.compressed/1"


def _pack_tensor(tensor: torch.Tensor, spec: LayerQuantSpec | None) -> dict[str, Any]:
    """int8 codes (if spec) and/or sparse storage (bitmask + non-zero values) for one weight."""
    tensor = tensor.detach().cpu()
    entry: dict[str, Any] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
    values = quantize_weight(tensor, spec) if spec is not None else tensor
    if spec is not None and spec.bn is None:
        entry["kind"] = "int8"
    elif spec is not None:
        entry["kind"] = "int8_bn"  # codes of the folded weight; stored weight = codes * scale / factor
    else:
        entry["kind"] = "float"
    flat = values.reshape(-1)
    nonzero = flat != 0
    if int(nonzero.sum()) * 8 < flat.numel() * 7:  # sparse storage pays off once >1/8 zeros
        entry["mask"] = _pack_bits(nonzero)
        entry["values"] = flat[nonzero].clone()
    else:
        entry["values"] = values.clone()
    return entry


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    padded = F.pad(mask.to(torch.uint8), (0, (-mask.numel()) % 8)).reshape(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (padded * weights).sum(dim=1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:numel].bool()


def _unpack_tensor(entry: dict[str, Any]) -> torch.Tensor:
    shape = entry["shape"]
    values = entry["values"]
    if "mask" in entry:
        numel = 1
        for size in shape:
            numel *= size
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[_unpack_bits(entry["mask"], numel)] = values
        values = dense
    return values.reshape(shape)


def save_compressed(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a compact checkpoint: int8 codes + scales for quantized weights, sparse tensors without zeros.

    A weight with more than 1/8 zeros is stored as a bitmask and its non-zero values. Other entries of
    the ``state_dict`` are stored as they are. The file is a ``torch.save`` of plain tensors and dicts
    (loadable with ``weights_only=True``).
    """
    root = unwrap_model(model)
    qparams = get_qparams(root)
    state = root.state_dict()
    weight_specs = {f"{name}.weight": spec for name, spec in qparams.items()}
    tensors = {}
    for key, tensor in state.items():
        spec = weight_specs.get(key)
        if spec is not None and spec.bn is not None:
            factor = bn_fold_factor(root.get_submodule(spec.bn)).cpu()
            tensor = tensor.detach().cpu().float() * factor.reshape((-1,) + (1,) * (tensor.dim() - 1))
        tensors[key] = _pack_tensor(tensor, spec) if tensor.is_floating_point() else {"values": tensor.detach().cpu().clone(), "kind": "raw"}
    torch.save({"format": _FORMAT, "tensors": tensors, "qparams": qparams_to_state(qparams)}, os.fspath(path))


def load_compressed(path: str | os.PathLike, fresh_model: nn.Module) -> nn.Module:
    """Load a ``save_compressed`` file into ``fresh_model`` (same architecture), strictly; returns it.

    The result computes the same float outputs as the saved model and carries its ``compress_qparams``.
    """
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"`path`: {os.fspath(path)!r} is not a save_compressed file")
    root = unwrap_model(fresh_model)
    qparams = qparams_from_state(payload["qparams"])
    weight_specs = {f"{name}.weight": spec for name, spec in qparams.items()}
    state = {}
    for key, entry in payload["tensors"].items():
        if entry["kind"] == "raw":
            state[key] = entry["values"]
            continue
        tensor = _unpack_tensor(entry)
        if entry["kind"] in ("int8", "int8_bn"):
            tensor = dequantized_weight(tensor, weight_specs[key])
        state[key] = tensor.to(getattr(torch, entry["dtype"]))
    # a folded conv's weight is stored as codes * scale / bn_factor: needs the BN's loaded statistics
    for key, entry in payload["tensors"].items():
        if entry["kind"] == "int8_bn":
            spec = weight_specs[key]
            bn_state = {k.removeprefix(spec.bn + "."): v for k, v in state.items() if k.startswith(spec.bn + ".")}
            bn = copy.deepcopy(root.get_submodule(spec.bn))
            bn.load_state_dict(bn_state)
            factor = bn_fold_factor(bn).reshape((-1,) + (1,) * (state[key].dim() - 1))
            state[key] = (state[key].float() / factor).to(state[key].dtype)  # as QAT's finalize: q(w f) / f
    root.load_state_dict(state, strict=True)
    set_qparams(root, qparams)
    return fresh_model
