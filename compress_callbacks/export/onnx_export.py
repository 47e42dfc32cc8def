"""ONNX export: the portable QuantizeLinear/DequantizeLinear graph of a model with specs.

>>> import os, tempfile, onnx, torch, torch.nn as nn
>>> from compress_callbacks.quantization.ptq import calibrate
>>> torch.manual_seed(0) and None
>>> model = calibrate(nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval(), [torch.randn(16, 8)])
>>> path = export_onnx(model, example_inputs=torch.randn(1, 8), path=os.path.join(tempfile.mkdtemp(), "m.onnx"))
>>> [node.op_type for node in onnx.load(path).graph.node if node.op_type != "Constant"]
['QuantizeLinear', 'DequantizeLinear', 'DequantizeLinear', 'Gemm', 'Relu']
>>> sorted(str(i.data_type) for i in onnx.load(path).graph.initializer if len(i.dims) == 2)   # int8 weight codes
['3']
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..targets import unwrap_model
from .onnx_lm import check_token_inputs, is_transformers_model, language_model_onnx
from .onnx_passes import _fold_weight_quantizers, _uint8_weight_codes
from .ort import _calibration_batches, _layers_ort_computes_float, _output_template, _quantize_outputs
from .quantized_graph import _as_tuple, _float32_inputs, _require_qparams, quantized_copy

__all__ = ["export_onnx"]

ONNX_OPSET = 17


def _onnx_model(model: nn.Module, example_inputs: Any, weight_dtype: str = "int8"):
    """The portable Q/DQ ONNX model (a ``ModelProto``) of a model with specs, and the structure of its
    outputs (see ``ort._output_template``; None when the graph's outputs cannot be mapped onto it).

    Graph inputs are named ``input_<position>`` (an input the graph does not use is left out of it),
    outputs ``output_<i>`` in the order of the model's output tensors (nested tuples / dicts flattened).
    A Transformers ``PreTrainedModel`` is exported by :mod:`.onnx_lm` (``torch.export``, dynamic batch
    and sequence axes, opset 18); any other model by the TorchScript exporter (dynamic batch, opset 17).
    """
    inputs = _float32_inputs(_as_tuple(example_inputs))
    if is_transformers_model(model):
        onnx_model, template = language_model_onnx(model, inputs)
        if weight_dtype == "uint8":
            _uint8_weight_codes(onnx_model)
        return onnx_model, template
    return _torchscript_onnx_model(model, inputs, weight_dtype)


def _torchscript_onnx_model(model: nn.Module, inputs: tuple, weight_dtype: str):
    import onnx

    graph_model = quantized_copy(model)
    with torch.no_grad():
        outputs = graph_model(*inputs)
    template, n_out = _output_template(outputs)
    input_names = [f"input_{i}" for i in range(len(inputs))]
    output_names = [f"output_{i}" for i in range(n_out)]
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), _without_exporter_log():  # the TorchScript exporter is deprecated in favour
            warnings.simplefilter("ignore", DeprecationWarning)  # of dynamo; it maps fake-quant ops to Q/DQ directly
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
    except torch.onnx.OnnxExporterError as error:
        raise RuntimeError(
            f"the TorchScript ONNX exporter cannot export {type(unwrap_model(model)).__name__}: {error}. A Transformers "
            "language model exports (dynamic batch and sequence axes) when passed as the PreTrainedModel itself, "
            "with `example_inputs=input_ids` or `(input_ids, attention_mask)`, not inside a wrapper"
        ) from None
    onnx_model = onnx.load_from_string(buffer.getvalue())
    _fold_weight_quantizers(onnx_model, weight_dtype)
    if len(onnx_model.graph.output) != n_out:
        template = None
    return onnx_model, template


@contextlib.contextmanager
def _without_exporter_log():
    """Hold back what is written to the process's stdout (file descriptor 1) meanwhile; pass it on unless an
    exception ends the block. The TorchScript exporter prints its whole IR graph there when it fails
    (its ONNX log is always on in torch 2.13), pages of it for a language model, before raising."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 1)
        failed = True
        try:
            yield
            failed = False
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            if not failed:
                held.seek(0)
                text = held.read().decode(errors="replace")
                if text:
                    sys.stdout.write(text)


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
    specs (quantize it with ``calibrate`` first) or one not finalized yet. A half-precision model is
    exported in float32 (with a warning). ``calibration`` is read once, up front, and every batch is
    checked against ``example_inputs`` (same number of inputs, same shapes but for the batch size).

    A Transformers ``PreTrainedModel`` (a causal LM) is exported with ``torch.export`` instead (opset
    18, :mod:`.onnx_lm`): ``example_inputs`` is ``input_ids`` or ``(input_ids, attention_mask)``, both
    the batch and the sequence axis are dynamic, the model runs with ``use_cache=False`` (logits of
    every position, no key/value cache), and layers of 4 bits or fewer are packed as ONNX Runtime's
    ``MatMulNBits`` (:mod:`.onnx_nbits`); an exporter failure raises one ``RuntimeError`` naming the cause.

    The LLM schemes export too, exactly as trained: group-wise weights (``weight_group_size`` g) are
    stored one row of codes per group (``DequantizeLinear`` per row, then reshaped; 4-bit groups of a
    power of two from 16 up packed in ``MatMulNBits`` with ``block_size`` g), dynamic activations
    (``activation_scheme="dynamic"``) are quantized per token in plain ONNX ops, and an ``nn.Embedding``
    with a spec gathers from its dequantized int8 codes.
    """
    if weight_dtype not in ("int8", "uint8"):
        raise ValueError(f"`weight_dtype` must be 'int8' or 'uint8', got {weight_dtype!r}")
    inputs = _as_tuple(example_inputs)
    language_model = is_transformers_model(model)
    if language_model:
        check_token_inputs(inputs)
    batches = _calibration_batches(calibration, inputs, free_dims=2 if language_model else 1)
    _require_qparams(model, "export_onnx")
    onnx_model, _ = _onnx_model(model, inputs, weight_dtype=weight_dtype)
    float_layers = _layers_ort_computes_float(onnx_model) if batches is not None else None
    if float_layers:  # the file needs the calibrated points, not a second look at what stays float
        _quantize_outputs(onnx_model, float_layers, batches)
    data = onnx_model.SerializeToString()
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(data)
    return path
