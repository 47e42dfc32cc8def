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

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "cosine_feature_loss",
    "mse_feature_loss",
    "position_weights",
    "soft_kd_loss",
    "token_kd_losses",
]

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
    valid = torch.ones(leading_shape, dtype=torch.bool, device=device)
    if targets is not None:
        if targets.shape != leading_shape:
            raise ValueError(f"`targets` must have shape {tuple(leading_shape)} (the logits without the class dim), got {tuple(targets.shape)}")
        valid = valid & (targets != ignore_index)
    if mask is not None:
        if mask.shape != leading_shape:
            raise ValueError(f"`attention_mask` must have shape {tuple(leading_shape)}, got {tuple(mask.shape)}")
        valid = valid & (mask != 0)
    valid = valid.reshape(-1)
    count = valid.sum()
    weights = valid.float() / count.clamp(min=1)
    return weights, count


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

    Returns ``(soft, hard)``: ``soft = T^2 * mean_valid KL(p_t || p_s)`` and
    ``hard = mean_valid CE(student, targets)`` (``None`` without ``targets``). A position is valid
    when its target is not ``ignore_index`` and ``mask`` is non-zero there; for ``[B, C]`` logits
    with every target valid, ``soft`` is the ``batchmean`` KL times ``T^2``.

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
    temperature = check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
            " (`student_outputs` / `teacher_outputs` must share batch, positions and vocabulary)"
        )
    if student_logits.dim() < 1:
        raise ValueError("`student_outputs` logits need a class dimension")
    vocab = student_logits.shape[-1]
    small_classification = student_logits.dim() == 2 and mask is None and chunk_size is None
    if small_classification and student_logits.numel() <= DEFAULT_CHUNK_ELEMENTS and (
        targets is None or targets.shape == student_logits.shape[:-1]
    ):
        return _classification_kd_losses(student_logits, teacher_logits, temperature, targets, ignore_index, with_hard)
    weights, _ = position_weights(student_logits.shape[:-1], student_logits.device, targets, mask, ignore_index)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_targets = None if targets is None or not with_hard else targets.reshape(-1).clamp(min=0)  # ignored rows weigh 0
    rows = max(1, DEFAULT_CHUNK_ELEMENTS // vocab) if chunk_size is None else int(chunk_size)
    if rows < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {chunk_size!r}")
    soft, hard = _ChunkedTokenKD.apply(student, teacher, flat_targets, weights, temperature, rows)
    return soft, (hard if flat_targets is not None else None)


def _classification_kd_losses(student, teacher, temperature, targets, ignore_index, with_hard):
    """``[B, C]`` logits small enough to need no chunking: native kernels (fewer passes than the
    chunked function for small C). Same values as the chunked path."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl_rows = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    if targets is None:
        return kl_rows.mean() * temperature**2, None
    valid = (targets != ignore_index).to(kl_rows.dtype)
    count = valid.sum().clamp_min(1.0)
    soft = (kl_rows * valid).sum() / count * temperature**2
    hard = F.cross_entropy(student.float(), targets, ignore_index=ignore_index, reduction="sum") / count if with_hard else None
    return soft, hard


def _rows_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor | None,
    weights: torch.Tensor,
    temperature: float,
    need_grads: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Over rows of ``[N, V]`` logits, in float32: the weighted sums ``T^2 * KL`` and CE, and their gradients.

    ``d/ds T^2 KL(p_t || softmax(s/T)) = T * (softmax(s/T) - p_t)``; ``d/ds CE = softmax(s) - onehot``.
    """
    student = student.float()
    w = weights[:, None]
    log_p_student = F.log_softmax(student / temperature if temperature != 1.0 else student, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=-1)
    p_teacher = log_p_teacher.exp()
    soft = ((p_teacher * (log_p_teacher - log_p_student)).sum(-1) * weights).sum() * temperature**2
    grad_soft = log_p_student.exp().sub_(p_teacher).mul_(w * temperature) if need_grads else None
    if targets is None:
        return soft, torch.zeros_like(soft), grad_soft, None
    log_p = log_p_student if temperature == 1.0 else F.log_softmax(student, dim=-1)
    hard = -(log_p.gather(1, targets[:, None]).squeeze(1) * weights).sum()
    if not need_grads:
        return soft, hard, None, None
    grad_hard = log_p.exp()
    grad_hard.scatter_add_(1, targets[:, None], torch.full_like(grad_hard[:, :1], -1.0))
    return soft, hard, grad_soft, grad_hard.mul_(w)


class _ChunkedTokenKD(torch.autograd.Function):
    """Soft KD + CE with analytic gradients.

    One chunk: the gradients are computed with the loss and kept (their size is one chunk).
    More chunks: nothing of size ``N x V`` is kept; the backward recomputes chunk by chunk.
    """

    @staticmethod
    def forward(ctx, student, teacher, targets, weights, temperature, rows):
        ctx.temperature, ctx.rows, ctx.dtype = temperature, rows, student.dtype
        if student.shape[0] <= rows:
            soft, hard, grad_soft, grad_hard = _rows_losses(student, teacher, targets, weights, temperature)
            ctx.save_for_backward(grad_soft, grad_hard)
            ctx.single_chunk = True
            return soft, hard
        soft = torch.zeros((), dtype=torch.float32, device=student.device)
        hard = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], rows):
            chunk = slice(start, start + rows)
            chunk_targets = None if targets is None else targets[chunk]
            s, h, _, _ = _rows_losses(student[chunk], teacher[chunk], chunk_targets, weights[chunk], temperature, False)
            soft += s
            hard += h
        ctx.save_for_backward(student, teacher, targets, weights)
        ctx.single_chunk = False
        return soft, hard

    @staticmethod
    def backward(ctx, grad_soft_out, grad_hard_out):
        if ctx.single_chunk:
            grad_soft, grad_hard = ctx.saved_tensors
            grad = grad_soft * grad_soft_out
            if grad_hard is not None:
                grad += grad_hard * grad_hard_out
            return grad.to(ctx.dtype), None, None, None, None, None
        student, teacher, targets, weights = ctx.saved_tensors
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.rows):
            chunk = slice(start, start + ctx.rows)
            chunk_targets = None if targets is None else targets[chunk]
            _, _, grad_soft, grad_hard = _rows_losses(student[chunk], teacher[chunk], chunk_targets, weights[chunk], ctx.temperature)
            g = grad_soft.mul_(grad_soft_out)
            if grad_hard is not None:
                g += grad_hard.mul_(grad_hard_out)
            grad[chunk] = g
        return grad, None, None, None, None, None


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
