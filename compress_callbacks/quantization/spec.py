"""What QAT learned, in the form ``export`` reads: per-layer quantization specs on a side attribute.

``QuantizationAwareTraining.finalize`` leaves plain modules (original types and ``state_dict`` keys)
with weights snapped to their grid, and sets ``model.compress_qparams`` (a plain attribute, not a
buffer, so ``state_dict`` is unchanged) to ``{qualified_module_name: LayerQuantSpec}``.

Conventions (shared by training and export):

- weights: per output channel (dim ``weight_axis``: 0, or 1 for Transformers ``Conv1D``, whose
  weight is stored ``[in, out]``), symmetric, zero point 0, signed restricted range
  ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (int8: [-127, 127], int4: [-7, 7]),
  ``codes = clamp(round_half_even(w * (1 / scale)), -qmax, qmax)``
  (:func:`~compress_callbacks.quantization.grid.weight_codes`);
- ``weight_group_size`` g (None: per channel): ``weight_scale`` is ``[out, in / g]``, one scale per g
  consecutive weights along the input dim (a Linear's last dim, an Embedding's ``embedding_dim``,
  a Conv1D's first dim): ``w[o, i]`` uses ``weight_scale[o, i // g]`` (torchao's ``PerGroup(g)``
  block ``(1, g)``). With a zero point of 0 the codes fit torchao's int4 / intx tensors as they are;
- activations (the layer's input), ``activation_scheme="static"``: per tensor, affine,
  ``[activation_qmin, activation_qmax]`` (uint8 [0, 255] by default), ``x_q = clamp(round(x / scale) +
  zero_point, qmin, qmax)`` with the learned ``input_scale`` / ``input_zero_point``;
- ``activation_scheme="dynamic"``: no stored range (``input_scale`` None); each token (row of the input
  viewed as ``[-1, in_features]``) is quantized at run time on ``[-128, 127]`` by torchao's int8
  asymmetric per-token rule (:func:`~compress_callbacks.quantization.fake_quant.per_token_activation_qparams`):
  the activations of ``Int8DynamicActivationIntxWeightConfig`` ("8da4w" with 4-bit weights);
- an ``nn.Embedding`` is weight-only (``activation_bits`` None), per row (its rows are its "output
  channels", ``weight_axis`` 0) or per group along ``embedding_dim``;
- ``tied_to``: another layer's name when this layer's weight is that layer's ``Parameter`` (an LM head
  tied to its input embedding): the weight was quantized once, on the same grid (equal
  ``weight_scale``); export it once;
- a Conv whose output feeds a BatchNorm that QAT folded names it in ``bn``: the stored conv weight is
  ``q(w_fold) / bn_factor`` with ``bn_factor = gamma / sqrt(running_var + eps)``, so conv + BN in
  eval compute the trained folded conv, and ``w * bn_factor`` lies on the grid ``weight_scale``.

>>> import torch
>>> spec = LayerQuantSpec(weight_bits=8, weight_scale=torch.tensor([0.5, 0.25]))
>>> quantize_weight(torch.tensor([[1.0, -0.5], [0.25, 40.0]]), spec).tolist()
[[2, -1], [1, 127]]
>>> grouped = LayerQuantSpec(weight_bits=4, weight_scale=torch.tensor([[0.5, 0.25]]), weight_group_size=2)
>>> quantize_weight(torch.tensor([[1.0, -0.5, 0.25, 40.0]]), grouped).tolist()   # codes clipped to [-7, 7]
[[2, -1, 1, 7]]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from .config import (
    ACTIVATION_QMAX,
    ACTIVATION_QMIN,
    check_activation_bits,
    check_activation_scheme,
    check_weight_bits,
    check_weight_group_size,
)
from .grid import dequantize_codes, weight_codes, weight_qmax

__all__ = [
    "QPARAMS_ATTR",
    "LayerQuantSpec",
    "weight_qmax",
    "quantize_weight",
    "dequantized_weight",
    "get_qparams",
    "set_qparams",
    "qparams_to_state",
    "qparams_from_state",
]

QPARAMS_ATTR = "compress_qparams"


@dataclass
class LayerQuantSpec:
    """Quantization of one Linear/Conv/Embedding layer, as learned in training (fields: see the module doc).

    >>> spec = LayerQuantSpec(weight_bits=4, weight_scale=torch.tensor([0.1, 0.2]))   # one scale per output channel
    >>> spec.weight_only, weight_qmax(spec.weight_bits)   # no input range: weight-only; codes in [-7, 7]
    (True, 7)
    """

    weight_bits: int
    weight_scale: torch.Tensor  # [out_channels] float32
    activation_bits: int | None = None  # None: weight-only
    input_scale: float | None = None
    input_zero_point: int | None = None
    activation_qmin: int = ACTIVATION_QMIN
    activation_qmax: int = ACTIVATION_QMAX
    bn: str | None = None  # qualified name of the BatchNorm folded into this conv during training
    weight_axis: int = 0  # the weight's dim of output channels: 1 for Transformers Conv1D ([in, out])
    weight_group_size: int | None = None  # None: weight_scale [out]; g: weight_scale [out, in / g]
    activation_scheme: str = "static"  # "dynamic": per-token int8 range at run time (no input_scale)
    tied_to: str | None = None  # the layer whose weight (the same Parameter) this one shares

    def __post_init__(self) -> None:  # the values QuantizationConfig accepts, checked the same way
        self.weight_bits = check_weight_bits(self.weight_bits)
        self.activation_bits = check_activation_bits(self.activation_bits)
        self.weight_group_size = check_weight_group_size(self.weight_group_size)
        self.activation_scheme = check_activation_scheme(self.activation_scheme)
        if self.weight_axis not in (0, 1) or isinstance(self.weight_axis, bool):
            raise ValueError(f"`weight_axis` must be 0 or 1 (Transformers Conv1D), got {self.weight_axis!r}")
        if self.weight_scale.dim() != (1 if self.weight_group_size is None else 2):
            raise ValueError(f"`weight_scale` must be [out] (or [out, in / weight_group_size] with groups), "
                             f"got shape {tuple(self.weight_scale.shape)} with weight_group_size={self.weight_group_size}")
        if self.activation_scheme == "dynamic" and (self.activation_bits is None or self.input_scale is not None):
            raise ValueError("`activation_scheme` 'dynamic' needs activation_bits=8 and no input_scale (ranges are per token)")

    @property
    def dynamic(self) -> bool:
        """Whether inputs are quantized per token at run time (``activation_scheme="dynamic"``)."""
        return self.activation_scheme == "dynamic"

    @property
    def weight_only(self) -> bool:
        return self.activation_bits is None


def quantize_weight(weight: torch.Tensor, spec: LayerQuantSpec) -> torch.Tensor:
    """Integer codes (int8 tensor) of a (BN-folded, if ``spec.bn``) weight on the spec's grid (per
    channel, or per group when ``spec.weight_group_size`` is set)."""
    return weight_codes(weight.float(), spec.weight_scale.float(), spec.weight_bits, dim=spec.weight_axis).to(torch.int8)


def dequantized_weight(codes: torch.Tensor, spec: LayerQuantSpec) -> torch.Tensor:
    """``codes * weight_scale`` per output channel, in float32 (the inverse of :func:`quantize_weight`).

    >>> spec = LayerQuantSpec(weight_bits=8, weight_scale=torch.tensor([0.5, 0.25]))
    >>> dequantized_weight(torch.tensor([[2, -1], [1, 127]], dtype=torch.int8), spec).tolist()
    [[1.0, -0.5], [0.25, 31.75]]
    """
    return dequantize_codes(codes, spec.weight_scale, dim=spec.weight_axis)


def get_qparams(model: nn.Module) -> dict[str, LayerQuantSpec]:
    """The specs a finalized QAT model carries (empty dict for a model without QAT)."""
    return dict(getattr(model, QPARAMS_ATTR, None) or {})


def set_qparams(model: nn.Module, qparams: dict[str, LayerQuantSpec]) -> None:
    """Attach specs to ``model`` (a plain attribute: ``state_dict`` keys do not change)."""
    model.__dict__[QPARAMS_ATTR] = dict(qparams)


def qparams_to_state(qparams: dict[str, LayerQuantSpec]) -> dict[str, dict[str, Any]]:
    """Plain dicts of tensors and numbers (for ``torch.save(..., weights_only=True)`` files)."""
    return {name: asdict(spec) for name, spec in qparams.items()}


def qparams_from_state(state: dict[str, dict[str, Any]]) -> dict[str, LayerQuantSpec]:
    return {name: LayerQuantSpec(**fields) for name, fields in state.items()}
