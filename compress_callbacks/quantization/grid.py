"""The integer grid of a quantized weight and the BatchNorm fold: the one home of this math.

Fake-quant (training), the spec (``quantize_weight``), post-training calibration and every export
path call these functions, so the codes the int8 model holds are the ones training simulated:

- :func:`weight_codes`: ``round_half_even(w * (1 / s))`` clamped to ``[-qmax, qmax]`` (symmetric,
  restricted range, zero point 0), the scale broadcast along the channel dim;
- :func:`bn_fold_factor`: ``gamma / sqrt(running_var + eps)``, what eval BatchNorm multiplies each
  channel by (a conv followed by it computes the conv of ``w * factor``);
- :func:`channel_view`: one value per channel shaped to broadcast against a weight (torch or numpy);
- :func:`group_rows`: a 2-D weight with group-wise scales (``weight_group_size``) seen as one row per
  group, output channels first: ``[out * in / g, g]``. A group is then a channel of that view, so
  the per-channel math above (codes, scales, fake-quant) serves groups unchanged. A scale of shape
  ``[out, in / g]`` (two dims) means groups everywhere below.

>>> import torch
>>> w = torch.tensor([[0.6, -1.0, 0.26], [0.5, 0.375, -0.125]])
>>> scale = torch.tensor([0.5, 0.25])
>>> weight_codes(w, scale, bits=2).tolist()          # 2-bit: codes in {-1, 0, 1}
[[1.0, -1.0, 1.0], [1.0, 1.0, -0.0]]
>>> dequantize_codes(weight_codes(w, scale, bits=8), scale).tolist()
[[0.5, -1.0, 0.5], [0.5, 0.5, -0.0]]
>>> bn_fold_factor(torch.tensor([2.0]), torch.tensor([3.0]), eps=1.0).tolist()
[1.0]
>>> groups = torch.tensor([[0.5, 0.25]])                  # one output channel, two groups of 2
>>> weight_codes(torch.tensor([[1.0, -0.5, 0.25, 0.5]]), groups, bits=4).tolist()
[[2.0, -1.0, 1.0, 2.0]]
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn as nn

__all__ = [
    "weight_qmax",
    "channel_view",
    "group_rows",
    "ungroup_rows",
    "weight_codes",
    "scaled_weight",
    "round_to_codes",
    "dequantize_codes",
    "bn_fold_factor",
    "batchnorm_fold_factor",
    "folded_conv_bias",
]

Array = TypeVar("Array")  # a torch.Tensor or a numpy.ndarray (both have .reshape)


def weight_qmax(bits: int) -> int:
    """Largest code of a symmetric signed ``bits``-bit weight (int8: 127).

    >>> weight_qmax(4)
    7
    """
    return 2 ** (bits - 1) - 1


def channel_view(values: Array, ndim: int, dim: int = 0) -> Array:
    """``values`` (one per channel along ``dim``) shaped to broadcast against an ``ndim``-dim tensor.

    Works on torch tensors and numpy arrays alike (a view, no copy).

    >>> channel_view(torch.tensor([1.0, 2.0]), 4).shape
    torch.Size([2, 1, 1, 1])
    >>> channel_view(torch.tensor([1.0, 2.0]), 3, dim=-1).shape
    torch.Size([1, 1, 2])
    """
    shape = [1] * ndim
    shape[dim] = -1
    return values.reshape(shape)


def group_rows(weight: torch.Tensor, group_size: int, dim: int = 0) -> torch.Tensor:
    """A 2-D weight, output channels (along ``dim``) first, as ``[out * in / group_size, group_size]``:
    one row per group of ``group_size`` consecutive input weights (a view when ``dim=0``).

    >>> group_rows(torch.arange(8.0).reshape(2, 4), 2).tolist()
    [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]
    >>> group_rows(torch.arange(8.0).reshape(4, 2), 2, dim=1).tolist()   # [in, out] (Transformers Conv1D)
    [[0.0, 2.0], [4.0, 6.0], [1.0, 3.0], [5.0, 7.0]]
    """
    if weight.dim() != 2:
        raise ValueError(f"group-wise scales need a 2-D weight, got shape {tuple(weight.shape)}")
    rows = weight.t() if dim == 1 else weight
    return rows.reshape(-1, group_size)


def ungroup_rows(grouped: Array, shape: torch.Size | tuple, dim: int = 0) -> Array:
    """The inverse of :func:`group_rows`: back to a weight of ``shape`` (output channels along ``dim``).

    >>> w = torch.arange(8.0).reshape(4, 2)
    >>> torch.equal(ungroup_rows(group_rows(w, 2, dim=1), w.shape, dim=1), w)
    True
    """
    if dim == 1:
        return grouped.reshape(shape[1], shape[0]).T
    return grouped.reshape(shape)


def _group_size(weight: torch.Tensor, scale: torch.Tensor, dim: int) -> int:
    """Weights per group of a ``[out, groups]`` scale on a 2-D ``weight`` (channels along ``dim``)."""
    return weight.shape[1 - dim] // scale.shape[1]


def weight_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int, dim: int = 0, *, clamp: bool = True) -> torch.Tensor:
    """Integer codes (as floats) of ``weight`` on the grid ``scale`` (one per channel along ``dim``,
    or ``[out, in / g]``: one per group of ``g`` input weights, see :func:`group_rows`).

    ``round_half_even(w * (1 / s))`` clamped to ``[-qmax, qmax]``: the multiplication by the
    reciprocal is what ``torch.fake_quantize_per_channel_affine`` and the native kernel compute, so a
    weight snapped by fake-quant gives back exactly its codes. Computed in at least float32.
    ``-0.0`` stays ``-0.0`` (``torch.round``).

    ``clamp=False`` skips the clamp, a pass over the weight that changes nothing when ``scale`` comes
    from each channel's ``max |w|`` with at most ``bits`` (``|w| * (1 / s)`` then rounds to at most
    ``qmax``): fake-quant's own scales. Any other scale needs the clamp.

    >>> w, s = torch.tensor([[0.3, -2.0]]), torch.tensor([2.0 / 7])   # s = max|w| / qmax(4 bits)
    >>> torch.equal(weight_codes(w, s, bits=4, clamp=False), weight_codes(w, s, bits=4))
    True
    """
    if scale.dim() == 2:  # per group: the groups are the channels of the grouped view
        rows = group_rows(weight, _group_size(weight, scale, dim), dim)
        return ungroup_rows(weight_codes(rows, scale.reshape(-1), bits, clamp=clamp), weight.shape, dim)
    return round_to_codes(scaled_weight(weight, scale, dim), bits, clamp=clamp)


def scaled_weight(weight: torch.Tensor, scale: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``w * (1 / s)`` per channel along ``dim``: the value :func:`round_to_codes` rounds (a new tensor).

    >>> scaled_weight(torch.tensor([[1.0, -3.0]]), torch.tensor([2.0])).tolist()
    [[0.5, -1.5]]
    """
    return weight * channel_view(scale.to(weight.device).reciprocal(), weight.dim(), dim)


def round_to_codes(scaled: torch.Tensor, bits: int, *, clamp: bool = True) -> torch.Tensor:
    """``round_half_even(scaled)``, clamped to ``[-qmax, qmax]`` unless ``clamp=False`` (in place).

    >>> round_to_codes(torch.tensor([0.5, -1.5, 9.0]), bits=4).tolist()
    [0.0, -2.0, 7.0]
    """
    codes = scaled.round_()
    if not clamp:
        return codes
    qmax = weight_qmax(bits)
    return codes.clamp_(-qmax, qmax)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``codes * scale`` per channel along ``dim`` (or per group: a ``[out, in / g]`` scale), in float32 or
    wider (the inverse of :func:`weight_codes`).

    >>> dequantize_codes(torch.tensor([[2, -1], [1, 127]], dtype=torch.int8), torch.tensor([0.5, 0.25])).tolist()
    [[1.0, -0.5], [0.25, 31.75]]
    """
    values = codes.to(torch.promote_types(codes.dtype, torch.float32))
    if scale.dim() == 2:
        rows = group_rows(values, _group_size(values, scale, dim), dim)
        return ungroup_rows(dequantize_codes(rows, scale.reshape(-1)), values.shape, dim)
    return values * channel_view(scale.to(codes.device, torch.float32), codes.dim(), dim)


def bn_fold_factor(gamma: torch.Tensor | None, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """``gamma / sqrt(running_var + eps)`` (``1 / sqrt(...)`` without affine ``gamma``).

    Differentiable in ``gamma``: QAT trains through it.
    """
    inv_std = torch.rsqrt(running_var + eps)
    return inv_std if gamma is None else gamma * inv_std


def batchnorm_fold_factor(bn: nn.Module) -> torch.Tensor:
    """:func:`bn_fold_factor` of an eval BatchNorm module's statistics (detached, float32).

    >>> bn = nn.BatchNorm1d(2, eps=1.0).eval()
    >>> _ = bn.running_var.fill_(3.0), bn.weight.data.fill_(4.0)
    >>> batchnorm_fold_factor(bn).tolist()
    [2.0, 2.0]
    """
    gamma = bn.weight.detach().float() if bn.weight is not None else None
    return bn_fold_factor(gamma, bn.running_var.float(), bn.eps)


def folded_conv_bias(conv: nn.Module, bn: nn.Module) -> torch.Tensor:
    """Bias of the single conv equal to ``bn(conv(x))`` in eval: ``(b - mean) * factor + beta``.

    >>> conv, bn = nn.Conv1d(1, 1, 1), nn.BatchNorm1d(1).eval()
    >>> _ = conv.bias.data.fill_(2.0), bn.running_mean.fill_(1.0), bn.bias.data.fill_(0.5)
    >>> round(folded_conv_bias(conv, bn).item(), 4)   # (2 - 1) * 1 / sqrt(1 + 1e-5) + 0.5
    1.5
    """
    factor = batchnorm_fold_factor(bn)
    bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros_like(factor)
    shift = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(factor)
    return (bias - bn.running_mean.float()) * factor + shift
