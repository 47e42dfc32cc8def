"""ONNX Runtime: the session module, and what export asks of ONNX Runtime about a Q/DQ graph.

- :class:`OnnxRuntimeModule`: a CPU session behind an ``nn.Module`` (what ``to_int8`` returns);
- ``_layers_ort_computes_float``: the Q/DQ layers ONNX Runtime's optimized graph leaves in float;
- ``_quantize_outputs``: calibrated Q/DQ on those layers' outputs, the ranges observed by running
  the Q/DQ graph itself (``calibration=`` of ``to_int8`` / ``export_onnx``).

>>> from onnx import helper, TensorProto
>>> graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
>>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
>>> _calibrated_ranges(model, ["y"], [torch.tensor([-1.0, 2.0]), torch.tensor([0.5])])
{'y': (tensor(0.), tensor(2.))}
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..quantization.fake_quant import activation_qparams
from ..quantization.observer import RangeObserver
from .onnx_passes import _insert_output_quantizers, _output_points, _quantized_skip_inputs
from .quantized_graph import _as_tuple

__all__ = ["OnnxRuntimeModule"]

FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


class OnnxRuntimeModule(nn.Module):
    """An ONNX Runtime CPU session behind an ``nn.Module`` interface (tensors in, tensors out).

    >>> import onnx
    >>> from onnx import helper, TensorProto
    >>> graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])])
    >>> module = OnnxRuntimeModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    >>> module(torch.tensor([-1.0, 2.0])).tolist()
    [0.0, 2.0]

    Outputs come back on the device of the first input. Picklable: the session is rebuilt from the
    stored model bytes.
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


def _check_calibration(calibration: Any) -> None:
    if calibration is not None and (isinstance(calibration, (torch.Tensor, dict, str, bytes)) or not hasattr(calibration, "__iter__")):
        raise TypeError(f"`calibration` must be an iterable of batches (e.g. a list of tensors), got a {type(calibration).__name__}")


def _as_calibration_batch(batch: Any, n_inputs: int) -> tuple:
    try:
        inputs = _as_tuple(batch)
    except TypeError:
        raise TypeError("`calibration` must be an iterable of model inputs (a tensor or a tuple of tensors per batch), "
                        f"got a batch of type {type(batch).__name__}") from None
    if len(inputs) != n_inputs:
        raise ValueError(f"`calibration`: each batch must hold the model's {n_inputs} input(s), got {len(inputs)}")
    return inputs


def _calibrated_ranges(onnx_model, names: list[str], batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
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
    observer = RangeObserver(len(names))
    count = 0
    for batch in batches:
        inputs = _as_calibration_batch(batch, len(input_names))
        values = session.run(names, {n: t.detach().cpu().float().contiguous().numpy() for n, t in zip(input_names, inputs)})
        for slot, array in enumerate(values):
            observer.observe(slot, torch.from_numpy(array))
        count += 1
    if count == 0:
        raise ValueError("`calibration` must hold at least one batch of model inputs, got none")
    return {name: (observer.observed_min[slot], observer.observed_max[slot]) for slot, name in enumerate(names)}


def _quantize_outputs(onnx_model, layers, batches) -> None:
    """Give the outputs of ``layers`` a calibrated uint8 Q/DQ pair, so ONNX Runtime runs them in int8.

    This is what ONNX Runtime's ``quantize_static`` does for tensors training never observed: per
    tensor, affine, over the min / max that ``batches`` produce (through the Q/DQ graph, i.e. the int8
    model's own inputs). A layer followed by its only reader, a Relu, is quantized after the Relu
    (range [0, max], zero point 0, which ONNX Runtime folds into QLinearConv / QGemm).
    """
    graph = onnx_model.graph
    points = _output_points(graph, layers)
    ranges = _calibrated_ranges(onnx_model, list(points), batches) if points else {}
    quantizers = {}
    for point, producer in points.items():
        scale, zero_point = activation_qparams(*ranges[point])
        quantizers[point] = (producer, float(scale), int(zero_point))
    _insert_output_quantizers(graph, quantizers)
    _quantized_skip_inputs(graph)


def _quantize_float_layer_outputs(onnx_model, calibration: Iterable[Any] | None) -> list | None:
    """With ``calibration``, quantize the outputs of the layers ONNX Runtime would run in float.

    Returns the layers that still run in float (None if ONNX Runtime cannot say).
    """
    float_layers = _layers_ort_computes_float(onnx_model)
    if float_layers and calibration is not None:
        _quantize_outputs(onnx_model, float_layers, calibration)
        float_layers = _layers_ort_computes_float(onnx_model)
    return float_layers
