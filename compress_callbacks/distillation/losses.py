"""Distillation losses as pure functions over tensors.

Soft term: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, summed over the classes and
averaged over the samples (``batchmean``), never over the elements: the textbook
``nn.KLDivLoss()`` with its default ``reduction="mean"`` divides by the class count too and
quietly shrinks the soft term by a factor of ``V``.

>>> import torch
>>> student, teacher = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[2.0, 0.0, -2.0]])
>>> round(float(soft_kd_loss(student, teacher, temperature=1.0)), 4)
0.1156
>>> labels = torch.tensor([0])
>>> round(float(token_kd_losses(student, teacher, temperature=1.0, targets=labels)[1]), 4)
0.4076
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "KDWorkspace",
    "cosine_feature_loss",
    "mse_feature_loss",
    "position_weights",
    "soft_kd_loss",
    "token_kd_loss",
    "token_kd_losses",
]

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)

#: Default number of logits (rows x vocabulary) processed at once by the chunked token loss.
DEFAULT_CHUNK_ELEMENTS = 1 << 21


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
    return float(temperature)


def soft_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` at temperature ``T``, ``batchmean`` over every row.

    Logits are ``[..., V]``; each leading position is a sample. The teacher is a constant target
    (no gradient flows into it). Computed in float32 whatever the input dtype.

    >>> import torch
    >>> s = torch.randn(4, 10)
    >>> float(soft_kd_loss(s, s, temperature=4.0)) == 0.0
    True
    """
    return token_kd_losses(student_logits, teacher_logits, temperature)[0]


def position_weights(
    leading_shape: torch.Size,
    device: torch.device,
    targets: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float weights ``valid / count`` over positions, and the count of valid positions.

    A position counts when its target is not ``ignore_index`` and ``mask`` (1 = real token,
    0 = padding) is non-zero there. With no valid position the weights are all zero.

    >>> import torch
    >>> w, n = position_weights(torch.Size([2, 3]), torch.device("cpu"), targets=torch.tensor([[1, -100, 2], [3, 4, 5]]),
    ...                         mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    >>> w.tolist(), int(n)
    ([0.25, 0.0, 0.25, 0.25, 0.25, 0.0], 4)
    """
    if targets is None and mask is None:  # every position counts: no masking kernels at all
        count = leading_shape.numel()
        return torch.full((count,), 1.0 / max(count, 1), device=device), torch.tensor(count, device=device)
    if targets is not None and targets.shape != leading_shape:
        raise ValueError(f"`targets` must have shape {tuple(leading_shape)} (the logits without the class dim), got {tuple(targets.shape)}")
    if mask is not None and mask.shape != leading_shape:
        raise ValueError(f"`attention_mask` must have shape {tuple(leading_shape)}, got {tuple(mask.shape)}")
    if targets is not None:
        valid = targets.reshape(-1) != ignore_index
        if mask is not None:
            valid &= mask.reshape(-1) != 0
    else:
        valid = mask.reshape(-1) != 0
    weights = valid.to(torch.float32)
    count = weights.sum()
    return weights.div_(count.clamp(min=1)), count.to(torch.int64)


def token_kd_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    *,
    targets: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    with_hard: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Soft KD term and cross-entropy, both averaged over the valid positions of ``[..., V]`` logits.

    Returns ``(soft, hard)``, each differentiable: ``soft = T^2 * mean_valid KL(p_t || p_s)`` and
    ``hard = mean_valid CE(student, targets)`` (``None`` without ``targets``). A position is valid
    when its target is not ``ignore_index`` and ``mask`` is non-zero there; for ``[B, C]`` logits
    with every target valid, ``soft`` is the ``batchmean`` KL times ``T^2``. When you only need
    ``alpha * soft + (1 - alpha) * hard``, :func:`token_kd_loss` is cheaper.

    Above ``chunk_size`` positions (default: ``DEFAULT_CHUNK_ELEMENTS // V``) the work runs chunk
    by chunk in forward *and* backward, so besides the gradient of the student logits (which any
    loss has) the extra peak memory is a few float32 chunks, not ``B*T*V``. Mathematically the
    chunked and the direct computation are the same.

    >>> import torch
    >>> s, t = torch.randn(2, 5, 7, requires_grad=True), torch.randn(2, 5, 7)
    >>> y = torch.randint(0, 7, (2, 5))
    >>> direct = token_kd_losses(s, t, 2.0, targets=y, chunk_size=100)
    >>> chunked = token_kd_losses(s, t, 2.0, targets=y, chunk_size=3)
    >>> all(torch.allclose(a, b) for a, b in zip(direct, chunked))
    True
    """
    args = _flat_kd_arguments(student_logits, teacher_logits, temperature, targets, mask, ignore_index, chunk_size, with_hard)
    soft, hard = _TokenKD.apply(*args, None, None)
    return soft, (hard if args[2] is not None else None)


def token_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    alpha: float,
    *,
    targets: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    with_hard: bool = True,
    workspace: KDWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(total, soft, hard)`` with ``total = alpha * soft + (1 - alpha) * hard`` differentiable.

    The same terms as :func:`token_kd_losses` (``soft`` and ``hard`` are returned detached, for
    logging), with one fused gradient: two exponentials per logit instead of the five to seven of
    ``log_softmax`` + ``kl_div`` + ``cross_entropy``, and one gradient buffer. Without ``targets``
    (or with ``with_hard=False``: the targets then only mark ignored positions) ``hard`` is None
    and ``total`` is ``soft``. A :class:`KDWorkspace` reused across calls saves the temporaries'
    allocations.

    >>> import torch, torch.nn.functional as F
    >>> s, t, y = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10), torch.randint(0, 10, (4,))
    >>> total, soft, hard = token_kd_loss(s, t, 4.0, 0.9, targets=y)
    >>> torch.allclose(hard, F.cross_entropy(s, y)) and torch.allclose(total, 0.9 * soft + 0.1 * hard)
    True
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")
    args = _flat_kd_arguments(student_logits, teacher_logits, temperature, targets, mask, ignore_index, chunk_size, with_hard)
    has_hard = args[2] is not None
    mix = (float(alpha), 1.0 - float(alpha)) if has_hard else (1.0, 0.0)
    total, soft, hard = _TokenKD.apply(*args, mix, workspace)
    return total, soft, (hard if has_hard else None)


def _flat_kd_arguments(student_logits, teacher_logits, temperature, targets, mask, ignore_index, chunk_size, with_hard):
    """Validate and flatten to ``[N, V]`` rows: (student, teacher, targets or None, weights, T, rows per chunk)."""
    temperature = check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
            " (`student_outputs` / `teacher_outputs` must share batch, positions and vocabulary)"
        )
    if student_logits.dim() < 1:
        raise ValueError("`student_outputs` logits need a class dimension")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be an int >= 1 or None, got {chunk_size!r}")
    vocab = student_logits.shape[-1]
    weights, _ = position_weights(student_logits.shape[:-1], student_logits.device, targets, mask, ignore_index)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_targets = None if targets is None or not with_hard else targets.reshape(-1).clamp(min=0)  # ignored rows weigh 0
    rows = max(1, DEFAULT_CHUNK_ELEMENTS // vocab) if chunk_size is None else chunk_size
    return student, teacher, flat_targets, weights, temperature, rows


class KDWorkspace:
    """Reusable float32 scratch buffers for the KD row math, grown on demand.

    >>> workspace = KDWorkspace()
    >>> first = workspace.get(0, torch.Size([4, 8]), torch.device("cpu"))
    >>> second = workspace.get(0, torch.Size([2, 8]), torch.device("cpu"))   # fits: the same memory, no allocation
    >>> second.data_ptr() == first.data_ptr(), tuple(second.shape), second.dtype
    (True, (2, 8), torch.float32)

    Fresh ``N x V`` temporaries cost page faults on every call on CPU (large blocks go back to the
    OS when freed); a ``DistillationLoss`` keeps one workspace, so only the gradient is new memory.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, slot: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
        key = (slot, device)
        buffer, view = self._buffers.get(key, (None, None))
        if view is not None and view.shape == shape:
            return view
        numel = shape.numel()
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
        view = buffer[:numel].view(shape)
        self._buffers[key] = (buffer, view)
        return view


def _scratch(workspace: KDWorkspace | None, slot: int, like: torch.Tensor) -> torch.Tensor:
    if workspace is None:
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return workspace.get(slot, like.shape, like.device)


def _exp_rows(logits: torch.Tensor, scale: float, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``out = exp(scale * (x - max x))`` in float32, the row max of ``scale * x`` **in log2 units**, the row sums.

    Computed as ``exp2`` of ``log2(e) * scale * (x - max x)`` (on CPU ``exp2`` is about 3x faster
    than ``exp``), the shift and scale in one pass. The natural-log row max is ``LN_2 * top2``.
    """
    scale2 = scale * LOG2_E
    top2 = logits.amax(-1, keepdim=True).float().mul_(scale2)
    torch.add(-top2, logits, alpha=scale2, out=out).exp2_()
    return out, top2, out.sum(-1, keepdim=True)


def _integer_power(x: torch.Tensor, n: int, out: torch.Tensor) -> torch.Tensor:
    """``out = x ** n`` for an integer ``n >= 1`` by squaring (cheaper than ``pow`` or ``exp``)."""
    if n == 1:
        return out.copy_(x)
    if n == 2:
        return torch.mul(x, x, out=out)
    if n % 2:
        return _integer_power(x, n - 1, out).mul_(x)
    half = _integer_power(x, n // 2, out)
    return half.mul_(half)


def _rows_kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor | None,
    weights: torch.Tensor,
    temperature: float,
    mix: tuple[float, float] | None,
    need_grads: bool = True,
    workspace: KDWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Over rows of ``[N, V]`` logits, in float32: the weighted sums ``T^2 * KL`` and CE, and gradients.

    With ``z_s = s / T``: ``KL_row = sum_j p_t,j (z_t,j - z_s,j) + lse(z_s) - lse(z_t)``,
    ``d(T^2 KL)/ds = T (p_s - p_t)``, ``CE_row = lse(s) - s_y``, ``dCE/ds = softmax(s) - onehot``.
    For an integer ``T``, ``exp(s - max s) = exp(z_s - max z_s)^T``, so the whole loss takes two
    exponentials per logit. Gradients: ``[soft, hard]`` separately (``mix=None``) or the single
    ``a * soft + b * hard`` for ``mix=(a, b)``. Only the returned gradients are new memory when a
    ``workspace`` is given.
    """
    T = temperature
    e_s, top2_s, sum_s = _exp_rows(student, 1.0 / T, torch.empty(student.shape, dtype=torch.float32, device=student.device))
    e_t, top2_t, sum_t = _exp_rows(teacher, 1.0 / T, _scratch(workspace, 0, teacher))  # p_t = e_t / sum_t
    diff = _scratch(workspace, 1, teacher)
    if teacher.dtype == student.dtype == torch.float32:
        torch.sub(teacher, student, out=diff)
    else:
        diff.copy_(teacher).sub_(student)
    # KL_row = sum_j p_t (t - s) / T + lse(z_s) - lse(z_t), with lse(z) = LN_2 * top2 + log(sum)
    kl_rows = diff.mul_(e_t).sum(-1, keepdim=True).div_(sum_t * T).add_(top2_s - top2_t, alpha=LN_2).add_(sum_s.div(sum_t).log_())
    soft = torch.dot(kl_rows.view(-1), weights) * T**2
    e_1 = None
    if targets is None:
        hard = torch.zeros_like(soft)
    else:
        if T == 1.0:
            e_1, top2_1, sum_1 = e_s, top2_s, sum_s
        elif T.is_integer() and T <= 16:  # exp(s - max s) = exp(z_s - max z_s) ** T
            e_1 = _integer_power(e_s, int(T), _scratch(workspace, 2, student))
            top2_1, sum_1 = top2_s * T, e_1.sum(-1, keepdim=True)
        else:
            e_1, top2_1, sum_1 = _exp_rows(student, 1.0, _scratch(workspace, 2, student))
        # CE_row = lse(s) - s_y
        ce_rows = sum_1.log().add_(top2_1, alpha=LN_2).sub_(student.gather(1, targets[:, None]))
        hard = torch.dot(ce_rows.view(-1), weights)
    if not need_grads:
        return soft, hard, []
    w = weights[:, None]
    if mix is None:  # separate gradients, one buffer each
        grad_hard = None
        if targets is not None:
            grad_hard = (e_1.clone() if e_1 is e_s or workspace is not None else e_1).mul_(w / sum_1)
            grad_hard.scatter_add_(1, targets[:, None], -w)
        grad_soft = e_s.mul_(w * T / sum_s).addcmul_(e_t, w * -T / sum_t)
        return soft, hard, [grad_soft, grad_hard]
    a, b = mix
    b = b if targets is not None else 0.0
    shared = e_1 is e_s  # T == 1: p_s serves both terms
    grad = e_s.mul_(w * (a * T + (b if shared else 0.0)) / sum_s).addcmul_(e_t, w * -(a * T) / sum_t)
    if b:
        if not shared:
            grad.addcmul_(e_1, w * b / sum_1)
        grad.scatter_add_(1, targets[:, None], w * -b)
    return soft, hard, [grad]


class _TokenKD(torch.autograd.Function):
    """Soft KD + CE over ``[N, V]`` rows with analytic gradients.

    ``mix=None``: outputs ``(soft, hard)``, both differentiable. ``mix=(a, b)``: outputs
    ``(total, soft, hard)`` with only ``total = a * soft + b * hard`` differentiable.
    One chunk: the gradients are computed with the loss and kept (their size is one chunk).
    More chunks: nothing of size ``N x V`` is kept; the backward recomputes chunk by chunk.
    """

    @staticmethod
    def forward(ctx, student, teacher, targets, weights, temperature, rows, mix, workspace):
        ctx.temperature, ctx.rows, ctx.dtype, ctx.mix, ctx.workspace = temperature, rows, student.dtype, mix, workspace
        ctx.single_chunk = student.shape[0] <= rows
        with _without_autocast(student.device.type):  # the math stays float32 under autocast
            soft, hard = _TokenKD._forward(ctx, student, teacher, targets, weights, temperature, rows, mix, workspace)
        if mix is None:
            return soft, hard
        ctx.mark_non_differentiable(soft, hard)
        return mix[0] * soft + mix[1] * hard, soft, hard

    @staticmethod
    def _forward(ctx, student, teacher, targets, weights, temperature, rows, mix, workspace):
        if ctx.single_chunk:
            soft, hard, grads = _rows_kd(student, teacher, targets, weights, temperature, mix, workspace=workspace)
            ctx.save_for_backward(*grads)
        else:
            soft = torch.zeros((), dtype=torch.float32, device=student.device)
            hard = torch.zeros((), dtype=torch.float32, device=student.device)
            for start in range(0, student.shape[0], rows):
                chunk = slice(start, start + rows)
                chunk_targets = None if targets is None else targets[chunk]
                s, h, _ = _rows_kd(student[chunk], teacher[chunk], chunk_targets, weights[chunk], temperature, mix, False, workspace)
                soft += s
                hard += h
            ctx.save_for_backward(student, teacher, targets, weights)
        return soft, hard

    @staticmethod
    def backward(ctx, *grad_outputs):
        scales = grad_outputs[:2] if ctx.mix is None else grad_outputs[:1]
        if ctx.single_chunk:
            return _combine(ctx.saved_tensors, scales, ctx.dtype), None, None, None, None, None, None, None
        student, teacher, targets, weights = ctx.saved_tensors
        grad = torch.empty_like(student)
        with _without_autocast(student.device.type):
            for start in range(0, student.shape[0], ctx.rows):
                chunk = slice(start, start + ctx.rows)
                chunk_targets = None if targets is None else targets[chunk]
                _, _, grads = _rows_kd(student[chunk], teacher[chunk], chunk_targets, weights[chunk], ctx.temperature, ctx.mix,
                                       workspace=ctx.workspace)
                grad[chunk] = _combine(grads, scales, ctx.dtype)
        return grad, None, None, None, None, None, None, None


def _without_autocast(device_type: str):
    """A context that switches autocast off for ``device_type`` where it is on (a no-op elsewhere)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, enabled=False)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta")
        pass
    return nullcontext()


def _combine(grads, scales, dtype: torch.dtype) -> torch.Tensor:
    """``sum(scale * grad)`` over the saved gradients (``None`` grads and scales skipped), in ``dtype``."""
    pairs = [(g, s) for g, s in zip(grads, scales) if g is not None and s is not None]
    if not pairs:
        return torch.zeros_like(grads[0]).to(dtype)
    (grad, scale), rest = pairs[0], pairs[1:]
    if not rest and grad.device.type == "cpu" and scale.numel() == 1 and float(scale) == 1.0:
        return grad.to(dtype)  # `loss.backward()` straight on the loss: the saved gradient as it is
    out = grad * scale
    for g, s in rest:
        out.add_(g * s)
    return out.to(dtype)


def mse_feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean squared error between (projected) student features and teacher features.

    >>> import torch
    >>> float(mse_feature_loss(torch.ones(2, 3), torch.zeros(2, 3)))
    1.0
    """
    _check_feature_shapes(student_features, teacher_features)
    return F.mse_loss(student_features.float(), teacher_features.detach().float())


def cosine_feature_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``1 - cosine similarity`` along ``dim`` (the feature dim), averaged over every other position.

    >>> import torch
    >>> x = torch.randn(4, 8)
    >>> abs(float(cosine_feature_loss(3 * x, x))) < 1e-6
    True
    """
    _check_feature_shapes(student_features, teacher_features)
    similarity = F.cosine_similarity(student_features.float(), teacher_features.detach().float(), dim=dim)
    return (1.0 - similarity).mean()


def _check_feature_shapes(student_features: torch.Tensor, teacher_features: torch.Tensor) -> None:
    if student_features.shape != teacher_features.shape:
        raise ValueError(
            f"student and teacher features differ in shape: {tuple(student_features.shape)} vs "
            f"{tuple(teacher_features.shape)}; use `projection=True` when only the widths differ"
        )
