"""``to_int8``: a real int8 model for CPU inference, on ONNX Runtime (default) or Inductor.

ONNX Runtime (default) runs the Q/DQ graph of ``export_onnx`` after the session-only rewrites of
:mod:`.onnx_passes`; Inductor compiles the same pattern in PyTorch ops (:mod:`.inductor`). The
example of :mod:`compress_callbacks.export` shows the call.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch.nn as nn

from .inductor import InductorInt8Module, _int8_layers_copy
from .onnx_export import _onnx_model
from .onnx_lm import check_token_inputs, is_transformers_model
from .onnx_passes import _constant_weights, _integer_heads
from .ort import OnnxRuntimeModule, _calibration_batches, _quantize_float_layer_outputs
from .quantized_graph import _as_tuple, _require_qparams

__all__ = ["to_int8", "cpu_has_vnni"]


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
    ``compress_callbacks.quantization.ptq.calibrate(model, batches)`` (post-training, static); so
    does a model not finalized yet (its ranges still live in the callbacks).

    The int8 module takes the same positional inputs as ``example_inputs`` (another number raises)
    and returns outputs in the model's own structure (a dict stays a dict). A half-precision model
    (bf16 / fp16) is converted in float32, with a warning: the module computes its float parts in
    float32, casts floating inputs to float32 and returns float32. ``calibration`` is read once, up
    front, and each batch is checked against ``example_inputs`` (same number of inputs, same shapes
    but for the batch size) whether or not a layer needs it.

    A Transformers ``PreTrainedModel`` goes through ``export_onnx``'s language-model path (dynamic batch
    and sequence axes, ``input_ids`` and optionally ``attention_mask``; see ``docs/export.md``): the
    module takes any batch size and sequence length and returns the model's output class (``.logits``).

    The LLM schemes (``weight_group_size``, ``activation_scheme="dynamic"``) run as trained on both
    backends: ONNX Runtime with 4-bit groups in ``MatMulNBits`` (float compute over the packed weights,
    per-token activation quantization in plain ops), Inductor over the dequantized codes: neither runs
    them with int8 GEMMs on CPU (:func:`~compress_callbacks.export.to_torchao` gives torchao's kernels).
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if weight_dtype not in (None, "int8", "uint8") or (weight_dtype is not None and backend != "onnxruntime"):
        raise ValueError(f"`weight_dtype` must be None, 'int8' or 'uint8' (onnxruntime backend only), got {weight_dtype!r}")
    if calibration is not None and backend != "onnxruntime":
        raise ValueError(f"`calibration` is for backend='onnxruntime' only (Inductor computes those layers in int8 "
                         f"with float outputs), got backend={backend!r}")
    inputs = _as_tuple(example_inputs)
    language_model = is_transformers_model(model)
    if language_model and backend == "onnxruntime":
        check_token_inputs(inputs)
    batches = _calibration_batches(calibration, inputs, free_dims=2 if language_model else 1)
    qparams = _require_qparams(model, "to_int8")
    if backend == "onnxruntime":
        weight_dtype = weight_dtype or ("int8" if cpu_has_vnni() else "uint8")
        onnx_model, outputs = _onnx_model(model, inputs, weight_dtype=weight_dtype)
        _integer_heads(onnx_model)  # rewrites for the session only; export_onnx keeps portable Q/DQ
        float_layers = _quantize_float_layer_outputs(onnx_model, batches)
        if float_layers and batches is not None:
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
        return OnnxRuntimeModule(onnx_model.SerializeToString(), num_inputs=len(inputs), outputs=outputs).eval()
    if not cpu_has_vnni() and any(spec.weight_bits == 8 for spec in qparams.values()):
        warnings.warn(
            "to_int8(backend='inductor'): this CPU has no VNNI, so oneDNN's u8 x s8 kernels may saturate with "
            "8-bit weights and the outputs drift from the fake-quant model; backend='onnxruntime' is exact here",
            stacklevel=2,
        )
    int8_model = InductorInt8Module(_int8_layers_copy(model).eval()).eval()
    int8_model(*inputs)  # compile now, not on the user's first batch
    return int8_model
