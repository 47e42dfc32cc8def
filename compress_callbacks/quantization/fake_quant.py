"""Pure fake-quantization math: weights per output channel, activations per tensor, BN folding.

Conventions are those of :mod:`compress_callbacks.quantization.spec`: weights are symmetric with the
restricted signed range ``[-(2**(b-1) - 1), 2**(b-1) - 1]``; activations are affine uint8 ``[0, 255]``
with a zero point that makes 0.0 exactly representable. The weight grid itself (codes, the BN fold
factor) is :mod:`compress_callbacks.quantization.grid`; range observers are
:mod:`compress_callbacks.quantization.observer`.

The weight scale comes from the current ``max |w|`` of each output channel, so no weight is ever
clipped and the straight-through gradient is exactly the identity (no mask pass in backward).

>>> import torch
>>> w = torch.tensor([[0.6, -1.0, 0.26], [0.5, 0.375, -0.125]], requires_grad=True)
>>> fake_quantize_weight(w, bits=2).tolist()   # 2-bit: codes {-1, 0, 1} times the channel scale
[[1.0, -1.0, 0.0], [0.5, 0.5, -0.0]]
>>> fake_quantize_weight(w, bits=2).sum().backward(); w.grad.tolist()   # straight-through
[[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
>>> scale, zero_point = activation_qparams(torch.tensor([-1.0]), torch.tensor([3.0]))
>>> round(float(scale), 6), int(zero_point)
(0.015686, 64)
"""

from __future__ import annotations

import torch

from .._native import activation_kernels, fake_quantize_rows_kernel
from .config import DYNAMIC_ACTIVATION_QMAX, DYNAMIC_ACTIVATION_QMIN
from .grid import channel_view, group_rows, round_to_codes, scaled_weight, ungroup_rows, weight_codes, weight_qmax

__all__ = [
    "WEIGHT_SCALE_EPS",
    "ACTIVATION_SCALE_EPS",
    "per_channel_weight_scale",
    "fake_quantize_weight_with_scale",
    "fake_quantize_weight",
    "fold_bn_fake_quantize_weight",
    "activation_qparams",
    "activation_bounds",
    "fake_quantize_activation",
    "fake_quantize_activation_with_bounds",
    "per_group_weight_scale",
    "fake_quantize_weight_groups",
    "per_token_quantize_dequantize",
    "lsq_gradient_factor",
    "fake_quantize_weight_learned",
    "per_token_activation_qparams",
    "fake_quantize_per_token",
]

#: smallest weight scale (an all-zero channel gets it; any floor only coarsens, never clips)
WEIGHT_SCALE_EPS = torch.finfo(torch.float32).tiny
#: smallest activation scale (torch.ao's choice: float32 machine epsilon)
ACTIVATION_SCALE_EPS = torch.finfo(torch.float32).eps


def _compiling() -> bool:
    """Under ``torch.compile`` tracing the native (ctypes) kernels would break the graph: use torch ops."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


def per_channel_weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 scale per output channel (dim 0): ``max |w| / (2**(bits-1) - 1)``.

    >>> per_channel_weight_scale(torch.tensor([[254.0, -127.0], [0.0, 0.0]]), 8)[0].item()
    2.0
    """
    flat = weight.detach().reshape(weight.shape[0], -1)
    # two vectorized reductions beat abs().amax() (a temporary) and aminmax / vector_norm(inf) along
    # a dim (~10x slower on CPU, measured)
    amax = torch.maximum(flat.amax(dim=1), flat.amin(dim=1).neg_()).float()
    # an all-zero (pruned) channel gets scale 1.0: any scale codes it as 0, and a denormal one makes
    # int8 backends (ONNX Runtime) lose precision on the whole layer
    scale = (amax / weight_qmax(bits)).clamp_min_(WEIGHT_SCALE_EPS)
    return scale.masked_fill_(amax == 0, 1.0)


@torch.no_grad()
def fake_quantize_weight_with_scale(weight: torch.Tensor, scale: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``codes * scale`` per output channel, the codes from :func:`~compress_callbacks.quantization.grid.weight_codes`.

    ``scale`` must come from ``max |w|`` (:func:`per_channel_weight_scale` with at most ``bits``), so
    no code reaches the grid's ends and the native one-pass kernel, which does not clamp, computes
    the same values. Rounds half to even, like ``torch.round`` and the ATen fake-quant kernels.
    """
    kernel = fake_quantize_rows_kernel() if weight.device.type == "cpu" and not _compiling() else None
    if (kernel is not None and weight.dtype == torch.float32 and scale.dtype == torch.float32 and weight.dim() >= 1
            and weight.is_contiguous() and scale.is_contiguous() and scale.numel() == weight.shape[0]):
        return kernel(weight, scale)  # the same values in one pass (compress_callbacks._native)
    # the scale comes from max |w|: nothing to clamp. A temporary, dequantized in place (dequantize_codes allocates)
    codes = weight_codes(weight, scale, bits, clamp=False)
    return codes.mul_(channel_view(scale, codes.dim())).to(weight.dtype)


class _WeightFakeQuantSTE(torch.autograd.Function):
    """Per-channel max-scaled fake quant; backward is the identity (nothing is ever clipped)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        return fake_quantize_weight_with_scale(weight, per_channel_weight_scale(weight, bits), bits)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return grad_output, None


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize ``weight`` per output channel (symmetric, restricted range), straight-through."""
    return _WeightFakeQuantSTE.apply(weight, bits)


def fold_bn_fake_quantize_weight(weight: torch.Tensor, factor: torch.Tensor, bits: int) -> torch.Tensor:
    """The conv weight that, followed by eval BatchNorm, computes the fake-quantized folded conv.

    ``q(w * factor) / factor`` (the QAT folding recipe with running statistics, applied in weight
    space, which is cheaper than rescaling the conv output). Gradients reach ``w`` straight through
    and ``factor`` (hence gamma) through the division.

    >>> w = torch.tensor([[1.0, 0.3]]); f = torch.tensor([2.0])
    >>> fold_bn_fake_quantize_weight(w, f, bits=2).tolist()   # q([2.0, 0.6]) = [2, 0] over 2
    [[1.0, 0.0]]
    """
    f = channel_view(factor, weight.dim())
    return fake_quantize_weight(weight * f, bits) / f


def activation_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, qmin: int = 0, qmax: int = 255
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine ``(scale float32, zero_point int32)`` from a range widened to contain 0 (elementwise).

    0.0 maps exactly to the integer ``zero_point``, so zero padding and ReLU zeros are exact.
    """
    lo = torch.clamp(min_val.float(), max=0.0)
    hi = torch.clamp(max_val.float(), min=0.0)
    scale = ((hi - lo) / float(qmax - qmin)).clamp_min_(ACTIVATION_SCALE_EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp_(qmin, qmax).to(torch.int32)
    return scale, zero_point


def activation_bounds(
    scale: torch.Tensor, zero_point: torch.Tensor, qmin: int = 0, qmax: int = 255
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(1 / scale, qmin - zero_point, qmax - zero_point)`` as float32: what the fast kernel reads."""
    zp = zero_point.float()
    return scale.reciprocal(), qmin - zp, qmax - zp


class _ActivationFakeQuantSTE(torch.autograd.Function):
    """``clamp(round(x / s), qmin - zp, qmax - zp) * s``; gradient passes where nothing was clamped.

    Same values as ``torch.fake_quantize_per_tensor_affine`` (which multiplies by ``1 / scale`` too),
    but from vectorized ops: the ATen CPU kernel is scalar and ~3x slower on a training step.
    """

    @staticmethod
    def forward(ctx, x, scale, inv_scale, qlo, qhi):  # type: ignore[override]
        per_tensor = all(torch.is_tensor(t) and t.numel() == 1 and t.device.type == "cpu" for t in (scale, inv_scale, qlo, qhi))
        eligible = per_tensor and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and not _compiling()
        kernels = activation_kernels() if eligible else None
        ctx.native = kernels
        if kernels is not None:  # one pass, same values (compress_callbacks._native)
            out, inside = kernels[0](x, float(scale), float(inv_scale), float(qlo), float(qhi))
            if ctx.needs_input_grad[0]:
                ctx.save_for_backward(inside)
            return out
        # in at least float32 whatever the qparams' shapes: a bf16 / fp16 input (autocast) is
        # quantized on the exact grid and rounded to its dtype once, at the end
        rounded = (x.to(torch.promote_types(x.dtype, torch.float32)) * inv_scale).round_()
        clamped = torch.clamp(rounded, qlo, qhi)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(clamped == rounded)
        return clamped.mul_(scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        if ctx.native is not None and grad_output.dtype == torch.float32 and grad_output.is_contiguous():
            return ctx.native[1](grad_output, inside), None, None, None, None
        return torch.where(inside.bool(), grad_output, 0.0), None, None, None, None


def fake_quantize_activation_with_bounds(
    x: torch.Tensor, scale: torch.Tensor, inv_scale: torch.Tensor, qlo: torch.Tensor, qhi: torch.Tensor
) -> torch.Tensor:
    """Per-tensor affine fake quant from precomputed :func:`activation_bounds` (no host sync)."""
    return _ActivationFakeQuantSTE.apply(x, scale, inv_scale, qlo, qhi)


def fake_quantize_activation(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int = 0, qmax: int = 255
) -> torch.Tensor:
    """Per-tensor affine fake quant (``x_q = clamp(round(x / scale) + zero_point, qmin, qmax)``), STE.

    >>> fake_quantize_activation(torch.tensor([-0.3, 0.26, 9.0]), torch.tensor([0.1]), torch.tensor([2]), 0, 10).tolist()
    [-0.20000000298023224, 0.30000001192092896, 0.800000011920929]
    """
    return fake_quantize_activation_with_bounds(x, scale, *activation_bounds(scale, zero_point, qmin, qmax))


# ---------------------------------------------------------------------------------------- low-bit LLM schemes
# Group-wise weights, trainable (LSQ) scales and per-token dynamic activations: the modes of
# ``weight_group_size`` / ``learn_scales`` / ``activation_scheme="dynamic"``. A group is a channel of
# the grouped view (:func:`~compress_callbacks.quantization.grid.group_rows`), so groups reuse the
# per-channel functions above (and their one-pass kernel) unchanged.


def per_group_weight_scale(weight: torch.Tensor, bits: int, group_size: int, dim: int = 0) -> torch.Tensor:
    """float32 ``[out, in / group_size]`` scales of a 2-D weight: each group's ``max |w| / qmax``.

    ``dim`` is the weight's dim of output channels (1 for Transformers ``Conv1D``'s ``[in, out]``).

    >>> per_group_weight_scale(torch.tensor([[7.0, -1.0, 0.5, 0.0]]), 4, group_size=2).tolist()
    [[1.0, 0.0714285746216774]]
    """
    out_channels = weight.shape[dim]
    return per_channel_weight_scale(group_rows(weight, group_size, dim), bits).reshape(out_channels, -1)


def fake_quantize_weight_groups(weight: torch.Tensor, bits: int, group_size: int, dim: int = 0) -> torch.Tensor:
    """Fake-quantize a 2-D weight per group of ``group_size`` input weights (symmetric, ``max |w|``
    scales, straight-through): :func:`fake_quantize_weight` on the grouped view.

    >>> w = torch.tensor([[7.0, -1.0, 0.5, 0.26]], requires_grad=True)
    >>> fake_quantize_weight_groups(w, 2, group_size=2).tolist()   # 2-bit: codes {-1, 0, 1} per group
    [[7.0, -0.0, 0.5, 0.5]]
    """
    return ungroup_rows(fake_quantize_weight(group_rows(weight, group_size, dim), bits), weight.shape, dim)


def lsq_gradient_factor(weights_per_scale: int, bits: int) -> float:
    """LSQ's scale-gradient factor ``1 / sqrt(n * qmax)`` (Esser et al., 2020) for ``n`` weights per scale.

    It keeps a scale's update commensurate with its weights' under one learning rate.

    >>> lsq_gradient_factor(28, 4)   # 1 / sqrt(28 * 7)
    0.07142857142857142
    """
    return 1.0 / (weights_per_scale * weight_qmax(bits)) ** 0.5


class _LearnedScaleFakeQuant(torch.autograd.Function):
    """``clamp(round(w / s), -qmax, qmax) * s`` per channel (dim 0) with a trainable ``s`` (LSQ).

    Gradients: ``w`` straight through where its code is not clipped (0 where it is); ``s`` the LSQ
    estimate ``round(w / s) - w / s`` (``+-qmax`` where clipped) summed over the channel, times
    :func:`lsq_gradient_factor`. A scale is floored at :data:`WEIGHT_SCALE_EPS` in the forward.
    """

    @staticmethod
    def forward(ctx, weight, scale, bits):  # type: ignore[override]
        positive = scale.detach().float().clamp_min(WEIGHT_SCALE_EPS)
        codes = weight_codes(weight.detach(), positive, bits)
        ctx.bits = bits
        ctx.save_for_backward(weight, positive)
        return codes.mul_(channel_view(positive, codes.dim())).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        weight, positive = ctx.saved_tensors
        qmax = weight_qmax(ctx.bits)
        ratio = scaled_weight(weight.float(), positive)  # w / s
        codes = round_to_codes(ratio.clone(), ctx.bits, clamp=False)
        inside = codes.abs() <= qmax
        grad_weight = torch.where(inside, grad_output, 0.0).to(weight.dtype)
        # d(q * s)/ds: round(w/s) - w/s where the code is inside the grid, the clamped code (+-qmax) outside
        slope = codes.clamp_(-qmax, qmax).sub_(ratio.mul_(inside))
        rows = weight.shape[0]
        grad_scale = (grad_output.float().reshape(rows, -1) * slope.reshape(rows, -1)).sum(dim=1)
        return grad_weight, grad_scale.mul_(lsq_gradient_factor(weight[0].numel(), ctx.bits)), None


def fake_quantize_weight_learned(weight: torch.Tensor, scale: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Fake-quantize ``weight`` on the trainable grid ``scale`` (``[out]``, or ``[out, in / g]``: per
    group), with LSQ gradients for both (see :class:`_LearnedScaleFakeQuant`).

    >>> w = torch.tensor([[0.9, -0.2, 3.0]], requires_grad=True)
    >>> s = torch.nn.Parameter(torch.tensor([0.5]))
    >>> out = fake_quantize_weight_learned(w, s, bits=3)   # codes in [-3, 3]: 3.0 is clipped to 1.5
    >>> out.tolist()
    [[1.0, -0.0, 1.5]]
    >>> out.sum().backward(); w.grad.tolist()              # no gradient where clipped
    [[1.0, 1.0, 0.0]]
    """
    if scale.dim() == 2:
        rows = group_rows(weight, weight.shape[1 - dim] // scale.shape[1], dim)
        return ungroup_rows(_LearnedScaleFakeQuant.apply(rows, scale.reshape(-1), bits), weight.shape, dim)
    if dim == 1:
        return _LearnedScaleFakeQuant.apply(weight.t(), scale, bits).t()
    return _LearnedScaleFakeQuant.apply(weight, scale, bits)


@torch.no_grad()
def per_token_activation_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` of each token (row of ``x`` over its last dim), shaped ``[..., 1]``, in ``x``'s dtype.

    torchao's int8 asymmetric per-token choice (``choose_qparams_affine``, ``MappingType.ASYMMETRIC``,
    the activations of ``Int8DynamicActivationIntxWeightConfig``): the range widened to contain 0,
    ``scale = (hi - lo) / 255`` floored at the dtype's smallest normal number,
    ``zero_point = clamp(-128 - round(lo / scale), -128, 127)``.

    >>> scale, zero_point = per_token_activation_qparams(torch.tensor([[0.0, 2.55], [-1.0, 1.55]]))
    >>> [round(v, 6) for v in scale.flatten().tolist()], zero_point.flatten().tolist()
    ([0.01, 0.01], [-128.0, -28.0])
    """
    lo = x.amin(dim=-1, keepdim=True).clamp_max_(0)
    hi = x.amax(dim=-1, keepdim=True).clamp_min_(0)
    scale = ((hi - lo) / float(DYNAMIC_ACTIVATION_QMAX - DYNAMIC_ACTIVATION_QMIN)).clamp_min_(torch.finfo(x.dtype).smallest_normal)
    zero_point = (DYNAMIC_ACTIVATION_QMIN - torch.round(lo / scale)).clamp_(DYNAMIC_ACTIVATION_QMIN, DYNAMIC_ACTIVATION_QMAX)
    return scale, zero_point


def _per_token_quantize_dequantize(x: torch.Tensor, with_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(clamp(round(x * (1 / s)) + z, -128, 127) - z) * s`` per token, and where nothing was clamped (or None)."""
    scale, zero_point = per_token_activation_qparams(x)
    shifted = (x * scale.reciprocal()).round_().add_(zero_point)
    codes = shifted.clamp(DYNAMIC_ACTIVATION_QMIN, DYNAMIC_ACTIVATION_QMAX)
    inside = (codes == shifted) if with_mask else None
    return codes.sub_(zero_point).mul_(scale), inside


def per_token_quantize_dequantize(x: torch.Tensor) -> torch.Tensor:
    """The values of :func:`fake_quantize_per_token` in plain tensor ops, without a gradient rule: the form the
    export graphs trace (ONNX ``ReduceMin`` / ``ReduceMax`` / ``Round`` / ``Clip``; Inductor fuses it).

    >>> x = torch.tensor([[0.0, 1.0, 2.55], [-3.0, 0.5, 7.0]])
    >>> torch.equal(per_token_quantize_dequantize(x), fake_quantize_per_token(x))
    True
    """
    return _per_token_quantize_dequantize(x)[0]


class _PerTokenFakeQuant(torch.autograd.Function):
    """``(clamp(round(x * (1 / s)) + z, -128, 127) - z) * s`` per token; gradient where nothing was clamped."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        values, inside = _per_token_quantize_dequantize(x, with_mask=ctx.needs_input_grad[0])
        if inside is not None:
            ctx.save_for_backward(inside)
        return values

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad_output, 0.0)


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token int8 fake quant of a layer input, as torchao's 8da4w / XNNPACK run it at inference.

    Every token (``x`` viewed as ``[-1, x.shape[-1]]``) gets its own asymmetric range, computed
    from ``x`` itself: nothing is observed or stored. Computed in ``x``'s dtype, as torchao does.

    >>> fake_quantize_per_token(torch.tensor([[0.0, 1.0, 2.55]])).tolist()
    [[0.0, 1.0, 2.549999952316284]]
    """
    return _PerTokenFakeQuant.apply(x)
