"""What QAT learned, in the form ``export`` reads: per-layer quantization specs on a side attribute.

``QuantizationAwareTraining.finalize`` leaves plain modules (original types and ``state_dict`` keys)
with weights snapped to their grid, and sets ``model.compress_qparams`` (a plain attribute, not a
buffer, so ``state_dict`` is unchanged) to ``{qualified_module_name: LayerQuantSpec}``.

Conventions (shared by training and export):

- weights: per output channel (dim ``weight_axis``: 0, or 1 for Transformers ``Conv1D``, whose
  weight is stored ``[in, out]``), symmetric, zero point 0, signed restricted range
  ``[-(2**(b-1) - 1), 2**(b-1) - 1]`` (int8: [-127, 127]);
- activations (the layer's input): per tensor, affine, ``[activation_qmin, activation_qmax]``
  (uint8 [0, 255] by default), ``x_q = clamp(round(x / scale) + zero_point, qmin, qmax)``;
- a Conv whose output feeds a BatchNorm that QAT folded names it in ``bn``: the stored conv weight is
  ``q(w_fold) / bn_factor`` with ``bn_factor = gamma / sqrt(running_var + eps)``, so conv + BN in
  eval compute the trained folded conv, and ``w * bn_factor`` lies on the grid ``weight_scale``.

>>> import torch
>>> spec = LayerQuantSpec(weight_bits=8, weight_scale=torch.tensor([0.5, 0.25]))
>>> quantize_weight(torch.tensor([[1.0, -0.5], [0.25, 40.0]]), spec).tolist()
[[2, -1], [1, 127]]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

from .config import ACTIVATION_QMAX, ACTIVATION_QMIN, check_activation_bits, check_weight_bits
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
    """Quantization of one Linear/Conv layer, as learned in training.

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

    def __post_init__(self) -> None:  # the bit widths QuantizationConfig accepts, checked the same way
        self.weight_bits = check_weight_bits(self.weight_bits)
        self.activation_bits = check_activation_bits(self.activation_bits)
        if self.weight_axis not in (0, 1) or isinstance(self.weight_axis, bool):
            raise ValueError(f"`weight_axis` must be 0 or 1 (Transformers Conv1D), got {self.weight_axis!r}")

    @property
    def weight_only(self) -> bool:
        return self.activation_bits is None


def quantize_weight(weight: torch.Tensor, spec: LayerQuantSpec) -> torch.Tensor:
    """Integer codes (int8 tensor) of a (BN-folded, if ``spec.bn``) weight on the spec's grid."""
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
