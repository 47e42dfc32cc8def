"""The quantized graph in float: BatchNorms folded, weights and inputs fake-quantized with the specs.

``quantized_copy`` is where every export path starts: the ONNX exporter traces it into
QuantizeLinear/DequantizeLinear, and the Inductor path swaps its layers for ``Int8Layer``.

>>> import torch, torch.nn as nn
>>> from compress_callbacks.quantization.ptq import calibrate, fake_quantized
>>> torch.manual_seed(0) and None
>>> model = calibrate(nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU()).eval(), [torch.randn(8, 2, 9)])
>>> copy = quantized_copy(model)
>>> [type(m).__name__ for m in copy]
['FakeQuantLayer', 'Identity', 'ReLU']
>>> x = torch.randn(2, 2, 9)
>>> with torch.no_grad(), fake_quantized(model):
...     bool((copy(x) - model(x)).abs().max() < 1e-4)
True
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quantization.fake_quant import per_token_quantize_dequantize
from ..quantization.fast_path import keep_on_module_path
from ..quantization.grid import batchnorm_fold_factor, channel_view, folded_conv_bias
from ..quantization.spec import QPARAMS_ATTR, LayerQuantSpec, dequantized_weight, get_qparams, quantize_weight
from ..targets import unwrap_model

__all__ = ["FakeQuantLayer", "quantized_copy"]


class FakeQuantLayer(nn.Module):
    """A Linear/Conv/Embedding whose weight and input pass through fake-quant with fixed (learned) qparams.

    >>> layer = nn.Linear(2, 1, bias=False)
    >>> layer.weight.data = torch.tensor([[0.5, -0.26]])
    >>> spec = LayerQuantSpec(weight_bits=2, weight_scale=torch.tensor([0.5]), activation_bits=8,
    ...                       input_scale=0.1, input_zero_point=0)
    >>> FakeQuantLayer(layer, spec)(torch.tensor([[1.04, 1.0]])).tolist()   # x -> [1.0, 1.0], w -> [0.5, -0.5]
    [[0.0]]

    Traced by ``torch.onnx.export`` this becomes QuantizeLinear/DequantizeLinear around the layer.
    The weight it holds is already on its grid (``codes * scale``), so fake-quant is exact on it.
    Group-wise scales (``weight_group_size`` g) quantize the weight viewed ``[out * in / g, g]`` per row;
    a dynamic spec quantizes each token of the input at run time
    (:func:`~compress_callbacks.quantization.fake_quant.per_token_quantize_dequantize`).
    """

    def __init__(self, layer: nn.Module, spec: LayerQuantSpec, bias: torch.Tensor | None = None):
        super().__init__()
        self.layer = layer
        self.spec = spec
        weight = layer.weight.detach()
        codes = quantize_weight(weight, spec)
        self.register_buffer("weight_scale", spec.weight_scale.to(weight.device, torch.float32).reshape(-1).clone())
        self.register_buffer("weight_zero_point", torch.zeros(spec.weight_scale.numel(), dtype=torch.int32, device=weight.device))
        with torch.no_grad():
            layer.weight.copy_(dequantized_weight(codes, spec).to(weight.dtype))
            if bias is not None:
                if layer.bias is None:
                    layer.bias = nn.Parameter(bias.to(weight.dtype))
                else:
                    layer.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        if spec.dynamic:
            x = per_token_quantize_dequantize(x)
        elif not spec.weight_only:
            x = torch.fake_quantize_per_tensor_affine(
                x, spec.input_scale, spec.input_zero_point, spec.activation_qmin, spec.activation_qmax
            )
        weight = self.layer.weight
        if spec.weight_group_size is None:  # (no reshape: ONNX Runtime's QDQ fusions match DequantizeLinear -> Gemm / Conv)
            weight = torch.fake_quantize_per_channel_affine(weight, self.weight_scale, self.weight_zero_point, 0, -128, 127)
        else:
            rows = weight.reshape(-1, spec.weight_group_size)
            rows = torch.fake_quantize_per_channel_affine(rows, self.weight_scale, self.weight_zero_point, 0, -128, 127)
            weight = rows.reshape(weight.shape)
        return layer_forward(self.layer, x, weight, getattr(self.layer, "bias", None))


def layer_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What ``layer`` (a Linear, Conv or Embedding) computes on ``x`` with ``weight`` and ``bias`` in place of its own.

    >>> embedding = nn.Embedding(3, 2, padding_idx=0)
    >>> layer_forward(embedding, torch.tensor([2]), torch.arange(6.0).reshape(3, 2), None).tolist()
    [[4.0, 5.0]]
    """
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(layer, nn.Embedding):
        return F.embedding(x, weight, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq, layer.sparse)
    return layer._conv_forward(x, weight, bias)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _require_finalized(model: nn.Module, function: str) -> None:
    """Refuse a model whose compression is still live: an attached ``CompressionManager`` trains it (or a
    model containing it), or it carries fake-quant layers of a ``QuantizationAwareTraining`` (as a deep
    copy or a pickle of a model in training does). Its ranges and masks live in the callbacks until
    ``finalize`` writes them into the model."""
    from ..manager import being_compressed
    from ..quantization.qat import STATE_ATTR

    root = unwrap_model(model)
    live = next((name for name, module in root.named_modules() if STATE_ATTR in module.__dict__), None)
    if being_compressed(root) or live is not None:
        where = f" (fake-quant layer {live!r})" if live is not None else ""
        raise ValueError(
            f"`model` is still in compression training{where}: {function} needs the finalized model, "
            "`compressed = manager.finalize(model)`; a copy taken during training is unfinished too "
            "(its learned ranges are not in it)"
        )


def _require_qparams(model: nn.Module, function: str) -> dict[str, LayerQuantSpec]:
    _require_finalized(model, function)
    qparams = get_qparams(unwrap_model(model))
    if not qparams:
        raise ValueError(
            f"`model` has no quantization specs (`compress_qparams`): {function} needs a model finalized "
            "after QuantizationAwareTraining, or one calibrated with "
            "compress_callbacks.quantization.ptq.calibrate(model, batches)"
        )
    return qparams


def _as_tuple(example_inputs: Any) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_inputs):
        return tuple(example_inputs)
    raise TypeError(f"`example_inputs` must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _as_linear(layer: nn.Module) -> nn.Linear:
    """Transformers ``Conv1D`` (``x @ w + b``, ``w`` stored ``[in, out]``) as the ``nn.Linear`` it equals.

    >>> from transformers.pytorch_utils import Conv1D
    >>> conv1d = Conv1D(nf=3, nx=2)
    >>> x = torch.randn(4, 2)
    >>> torch.allclose(_as_linear(conv1d)(x), conv1d(x))
    True
    """
    weight = layer.weight.detach()
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=layer.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias.detach())
    return linear


def _float32_inputs(inputs: tuple) -> tuple:
    """``inputs`` with every floating tensor in float32 (what the exported graphs compute in); others as they are."""
    return tuple(t.float() if t.is_floating_point() and t.dtype != torch.float32 else t for t in inputs)


def quantized_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy with BatchNorms folded into their convs and every spec'd layer a ``FakeQuantLayer``.

    Computes the same as ``fake_quantized(model)`` (up to float rounding of the BN fold). A
    Transformers ``Conv1D`` (spec ``weight_axis=1``) becomes the equal ``nn.Linear`` first, so every
    export path sees output channels along dim 0. The copy is float32: a half-precision model (bf16 /
    fp16) is converted with a warning, so its exported and int8 versions compute their float parts in
    float32 (the weights' grid is the same).
    """
    qparams = _require_qparams(model, "quantized_copy")
    root = copy.deepcopy(unwrap_model(model)).eval()
    root.__dict__.pop(QPARAMS_ATTR, None)
    other_floats = sorted({str(t.dtype).removeprefix("torch.") for t in (*root.parameters(), *root.buffers())
                           if t.is_floating_point() and t.dtype != torch.float32})
    if other_floats:
        warnings.warn(
            f"compress_callbacks.export: `model` holds {', '.join(other_floats)} tensors; its exported / int8 version "
            "computes its float parts in float32 and takes float32 inputs (others are cast)",
            stacklevel=3,
        )
        root.float()
    for name, spec in qparams.items():
        layer = root.get_submodule(name)
        if spec.weight_axis == 1:
            layer, spec = _as_linear(layer), dataclasses.replace(spec, weight_axis=0)
        bias = None
        if spec.bn is not None:
            bn = root.get_submodule(spec.bn)
            factor = batchnorm_fold_factor(bn).to(layer.weight.device, layer.weight.dtype)
            with torch.no_grad():
                layer.weight.mul_(channel_view(factor, layer.weight.dim()))
            bias = folded_conv_bias(layer, bn)
            _set_submodule(root, spec.bn, nn.Identity())
        _set_submodule(root, name, FakeQuantLayer(layer, spec, bias))
    keep_on_module_path(root, qparams)  # no fused Transformer eval path: it would read the replaced layers' weights
    return root
