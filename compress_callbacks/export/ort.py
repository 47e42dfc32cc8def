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
from torch.utils import _pytree as pytree

from .._progress import progress_bar
from ..quantization.fake_quant import activation_qparams
from ..quantization.observer import RangeObserver
from .onnx_passes import _insert_output_quantizers, _output_points, _quantized_skip_inputs
from .quantized_graph import _as_tuple, _float32_inputs

__all__ = ["OnnxRuntimeModule"]

FLOAT_COMPUTE_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")
INPUT_PREFIX = "input_"  # export names graph inputs input_<position in the call>


class _OutputSlot:
    """Stands for the ``index``-th output tensor in an output template (see ``_output_template``)."""

    def __init__(self, index: int) -> None:
        self.index = index


def _output_template(outputs: Any) -> tuple[Any, int]:
    """``outputs`` with each tensor replaced by its slot in the flattened order, and the number of tensors.

    Tuples, lists, dicts (and Transformers ``ModelOutput``) are walked with ``torch.utils._pytree``, in
    the order the ONNX exporter flattens them; other values stay in the template as they are.

    >>> template, count = _output_template({"logits": torch.zeros(1), "extra": (torch.ones(1), 3)})
    >>> count, _fill_template(template, ["a", "b"])
    (2, {'logits': 'a', 'extra': ('b', 3)})
    """
    leaves, spec = pytree.tree_flatten(outputs)
    count = 0
    slots = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            slots.append(_OutputSlot(count))
            count += 1
        else:
            slots.append(leaf)
    return pytree.tree_unflatten(slots, spec), count


def _fill_template(template: Any, outputs: list) -> Any:
    return pytree.tree_map(lambda leaf: outputs[leaf.index] if isinstance(leaf, _OutputSlot) else leaf, template)


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

    Takes exactly ``num_inputs`` positional tensors (default: the graph's inputs; ``to_int8`` gives the
    number of ``example_inputs``, including any the graph does not use): another number raises
    ``ValueError``, keyword arguments ``TypeError``, so that an input the export did not see (an
    ``attention_mask``) is never dropped silently. Floating inputs are cast to float32. Outputs come
    back on the device of the first input, in ``outputs`` (a template from ``_output_template``: the
    model's own dicts / tuples) or, without one, as one tensor or a tuple. Picklable: the session is
    rebuilt from the stored model bytes.
    """

    def __init__(self, onnx_model: bytes, num_threads: int | None = None, *, num_inputs: int | None = None,
                 outputs: Any = None):
        super().__init__()
        self.onnx_model = onnx_model
        self.num_threads = num_threads
        self.num_inputs = num_inputs
        self.outputs = outputs
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

    def forward(self, *inputs: torch.Tensor, **unexpected: Any):
        session = self.session
        graph_inputs = [meta.name for meta in session.get_inputs()]
        num_inputs, structure = getattr(self, "num_inputs", None), getattr(self, "outputs", None)  # (older pickles)
        expected = len(graph_inputs) if num_inputs is None else num_inputs
        if unexpected:
            raise TypeError(f"OnnxRuntimeModule takes its {expected} input(s) by position, as exported; got keyword "
                            f"argument(s) {', '.join(unexpected)}")
        if len(inputs) != expected:
            raise ValueError(f"OnnxRuntimeModule takes {expected} input(s), as exported, got {len(inputs)}; export "
                             "again with every input the model should read in `example_inputs`")
        if not all(isinstance(x, torch.Tensor) for x in inputs):
            raise TypeError(f"OnnxRuntimeModule takes tensors, got {[type(x).__name__ for x in inputs]}")
        inputs = _float32_inputs(inputs)
        positions = [_input_position(name, i) for i, name in enumerate(graph_inputs)]
        feeds = {name: inputs[i].detach().cpu().contiguous().numpy() for name, i in zip(graph_inputs, positions)}
        outputs = [torch.from_numpy(o).to(inputs[0].device) for o in session.run(None, feeds)]
        if structure is not None:
            return _fill_template(structure, outputs)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _input_position(name: str, index: int) -> int:
    """The call position a graph input reads: ``input_<k>`` -> k (export's names), else its own index."""
    suffix = name[len(INPUT_PREFIX):] if name.startswith(INPUT_PREFIX) else ""
    return int(suffix) if suffix.isdigit() else index


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


def _calibration_batches(calibration: Iterable[Any] | None, example_inputs: tuple,
                         free_dims: int = 1) -> tuple[tuple, ...] | None:
    """``calibration`` read once and checked against ``example_inputs``: each batch a tensor or a tuple of
    tensors, as many as the model's inputs, each shaped like its example but for its first ``free_dims``
    dims (the dynamic ones of the exported graph: the batch; batch and sequence for a Transformers model)
    and, like it, floating or not. None stays None."""
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, dict, str, bytes)) or not hasattr(calibration, "__iter__"):
        raise TypeError(f"`calibration` must be an iterable of batches (e.g. a list of tensors), got a {type(calibration).__name__}")
    batches = tuple(_as_calibration_batch(batch, len(example_inputs)) for batch in calibration)
    if not batches:
        raise ValueError("`calibration` must hold at least one batch of model inputs, got none")
    free = ("N", "T")[:free_dims]
    for number, batch in enumerate(batches):
        for position, (tensor, example) in enumerate(zip(batch, example_inputs)):
            if (tensor.dim() != example.dim() or tensor.shape[free_dims:] != example.shape[free_dims:]
                    or tensor.is_floating_point() != example.is_floating_point()):
                raise ValueError(
                    f"`calibration`: batch {number}, input {position} has shape {tuple(tensor.shape)} ({tensor.dtype}); "
                    f"the model is exported for shape ({', '.join(free + tuple(map(str, example.shape[free_dims:])))}) "
                    f"({example.dtype}), only {' and '.join(('the batch size', 'the sequence length')[:free_dims])} may differ"
                )
    return batches


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
    positions = [_input_position(name, i) for i, name in enumerate(input_names)]
    observer = RangeObserver(len(names))
    count = 0
    for batch in progress_bar(batches, None, desc="calibrate (ONNX Runtime)"):  # a bar on a terminal
        inputs = _float32_inputs(_as_tuple(batch))
        values = session.run(names, {n: inputs[i].detach().cpu().contiguous().numpy() for n, i in zip(input_names, positions)})
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
