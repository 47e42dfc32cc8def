"""Passes over an exported Q/DQ ONNX graph (``ModelProto``, edited in place).

- ``_fold_weight_quantizers``: ``QuantizeLinear(float weight)`` becomes an integer initializer;
- ``_uint8_weight_codes``: int8 weight initializers stored as uint8 + 128 (the same grid);
- ``_integer_heads``: a Q/DQ ``Gemm`` producing a graph output becomes ``MatMulInteger`` + rescale;
- ``_constant_weights``: the weights of layers ONNX Runtime computes in float, dequantized once;
- ``_output_points`` / ``_insert_output_quantizers`` / ``_quantized_skip_inputs``: calibrated Q/DQ
  on the outputs of layers nothing else quantizes (the ranges come from :mod:`.ort`);
- ``_drop_unused``: dead nodes and initializers.

Codes and dequantized weights come from :mod:`compress_callbacks.quantization.grid`, the functions
fake-quant uses, so the integers in the file are the ones training simulated. ONNX Runtime's
``quantize_static`` fed the learned scales (``TensorQuantOverrides``) and the onnxscript optimizer
were tried in their place and kept out: see ``docs/export.md`` ("Hand-written ONNX passes").

>>> import numpy as np
>>> from onnx import helper, numpy_helper, TensorProto
>>> weight = numpy_helper.from_array(np.array([[0.5, -1.0], [0.25, 0.0]], np.float32), "w")
>>> scale = numpy_helper.from_array(np.array([0.5, 0.25], np.float32), "s")
>>> zero = numpy_helper.from_array(np.zeros(2, np.int8), "z")
>>> nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"], axis=0),
...          helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["y"], axis=0)]
>>> graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
...                           initializer=[weight, scale, zero])
>>> model = helper.make_model(graph)
>>> _fold_weight_quantizers(model)
>>> [node.op_type for node in model.graph.node], numpy_helper.to_array(model.graph.initializer[-2]).tolist()
(['DequantizeLinear'], [[1, -2], [1, 0]])
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from ..quantization.grid import channel_view, dequantize_codes, weight_codes

__all__: list[str] = []  # internal to compress_callbacks.export


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


def _channel_axis(node, scale) -> int:
    """The axis a (De)QuantizeLinear ``scale`` runs along: its ``axis`` attribute if per channel, else 0."""
    if scale.ndim != 1:
        return 0  # one value: broadcasts along any axis
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A torch view of a (read-only) array from the graph; it is only read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": nothing writes to it
        return torch.from_numpy(array)


def _fold_weight_quantizers(onnx_model, weight_dtype: str = "int8") -> None:
    """Replace ``QuantizeLinear(float initializer)`` by an integer initializer feeding its DequantizeLinear.

    Weights are symmetric int8 (zero point 0) on the grid of ``weight_codes``; any other constant
    quantizer is left to ONNX Runtime. ``weight_dtype="uint8"`` stores the same grid shifted by 128
    (codes + 128, zero point 128).
    """
    from onnx import numpy_helper

    graph = onnx_model.graph
    initializers = {init.name for init in graph.initializer}
    value = _constant_values(graph)
    removed = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers:
            continue
        weight, scale, zero_point = value(node.input[0]), value(node.input[1]), value(node.input[2])
        if scale is None or zero_point is None or zero_point.dtype != np.int8 or np.any(zero_point != 0):
            continue
        codes = weight_codes(_tensor(weight), _tensor(scale), bits=8, dim=_channel_axis(node, scale)).numpy()
        codes, zero_point = _stored_codes(codes, zero_point, weight_dtype)
        name = node.input[0] + "_quantized"
        graph.initializer.append(numpy_helper.from_array(codes, name))
        zp_name = name + "_zero_point"
        graph.initializer.append(numpy_helper.from_array(zero_point, zp_name))
        for consumer in graph.node:
            if consumer.op_type == "DequantizeLinear" and consumer.input[0] == node.output[0]:
                consumer.input[0] = name
                consumer.input[2] = zp_name
        removed.append(node)
    for node in removed:
        graph.node.remove(node)
    _drop_unused(graph)


def _stored_codes(codes: np.ndarray, zero_point: np.ndarray, weight_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric weight codes and their (zero) zero point as stored: int8, or uint8 shifted by 128 (same grid).

    >>> _stored_codes(np.array([-127, 0, 127]), np.zeros(1, np.int8), "uint8")
    (array([  1, 128, 255], dtype=uint8), array([128], dtype=uint8))
    """
    if weight_dtype == "uint8":
        return (codes.astype(np.int32) + 128).astype(np.uint8), (np.asarray(zero_point).astype(np.int32) + 128).astype(np.uint8)
    return codes.astype(np.int8), np.asarray(zero_point).astype(np.int8)


def _uint8_weight_codes(onnx_model) -> None:
    """Store the int8 weight codes that feed ``DequantizeLinear`` (zero point 0) as uint8 codes + 128.

    For graphs whose weights are int8 initializers already (the dynamo export of :mod:`.onnx_lm`);
    ``_fold_weight_quantizers(..., "uint8")`` does the same while folding TorchScript's weight quantizers.
    """
    from onnx import numpy_helper

    graph = onnx_model.graph
    initializers = {init.name for init in graph.initializer}
    value = _constant_values(graph)
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in initializers or len(node.input) < 3:
            continue
        codes, zero_point = value(node.input[0]), value(node.input[2])
        if codes.dtype != np.int8 or zero_point is None or np.any(zero_point != 0):
            continue
        codes, zero_point = _stored_codes(codes, zero_point, "uint8")
        name = f"{node.input[0]}_uint8"
        graph.initializer.extend([numpy_helper.from_array(codes, name),
                                  numpy_helper.from_array(zero_point, f"{name}_zero_point")])
        node.input[0], node.input[2] = name, f"{name}_zero_point"
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


def _constant_weights(onnx_model, layers) -> None:
    """Dequantize, once, the weights of ``layers`` (which ONNX Runtime computes in float).

    ONNX Runtime dequantizes a float layer's weight at every call and cannot prepack it (for the
    benchmark CNN's last conv, 3.5 of its 5 ms). Its ``DequantizeLinear(weight codes)`` becomes the
    float initializer it computes, bit for bit, so outputs do not change.
    """
    from onnx import numpy_helper

    graph = onnx_model.graph
    value = _constant_values(graph)
    producer = {out: node for node in graph.node for out in node.output}
    for node in layers:
        dq = producer[node.input[1]]
        codes, scale, zero = value(dq.input[0]), value(dq.input[1]), value(dq.input[2])
        if codes is None or scale is None or zero is None:
            continue
        axis = _channel_axis(dq, scale)
        centered = codes.astype(np.int32) - channel_view(zero.astype(np.int32), codes.ndim, axis)
        weight = dequantize_codes(_tensor(centered), _tensor(scale.astype(np.float32)), axis).numpy()
        name = f"{dq.output[0]}_dequantized"
        graph.initializer.append(numpy_helper.from_array(weight, name))
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


def _insert_output_quantizers(graph, quantizers: dict[str, tuple[Any, float, int]]) -> None:
    """Put a uint8 ``QuantizeLinear -> DequantizeLinear`` pair on each ``{tensor: (producer, scale, zero point)}``.

    Every reader of the tensor then reads the dequantized copy; the pair sits right after the producer.
    """
    from onnx import helper, numpy_helper

    for point, (producer, scale, zero_point) in quantizers.items():
        q_name, dq_name = f"{point}_output_quantized", f"{point}_output_dequantized"
        graph.initializer.extend([
            numpy_helper.from_array(np.asarray(scale, np.float32), f"{point}_output_scale"),
            numpy_helper.from_array(np.asarray(zero_point, np.uint8), f"{point}_output_zero_point"),
        ])
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name == point:
                    node.input[i] = dq_name
        position = list(graph.node).index(producer) + 1
        args = [f"{point}_output_scale", f"{point}_output_zero_point"]
        graph.node.insert(position, helper.make_node("QuantizeLinear", [point, *args], [q_name], name=q_name))
        graph.node.insert(position + 1, helper.make_node("DequantizeLinear", [q_name, *args], [dq_name], name=dq_name))


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
