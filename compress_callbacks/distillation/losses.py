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

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .cache import TopKLogits
from .divergences import (
    DEFAULT_CHUNK_ELEMENTS,
    KDWorkspace,
    SoftTerm,
    check_divergence,
    check_temperature,
    soft_hard_rows,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "KDWorkspace",
    "check_labels",
    "check_temperature",
    "cosine_feature_loss",
    "mse_feature_loss",
    "position_weights",
    "soft_kd_loss",
    "token_kd_loss",
    "token_kd_losses",
]


def check_labels(targets: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """ValueError naming the first label outside ``[0, num_classes)`` that is not ``ignore_index``.

    >>> import torch
    >>> check_labels(torch.tensor([0, 4, -100]), 5, -100)
    >>> check_labels(torch.tensor([0, -1]), 5, -100)
    Traceback (most recent call last):
    ...
    ValueError: `targets` holds the label -1, outside [0, 5) and not ignore_index=-100
    """
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"`targets` must be integer class labels, got dtype {targets.dtype}")
    bad = ((targets < 0) | (targets >= num_classes)) & (targets != ignore_index)
    if bool(bad.any()):
        value = int(targets[bad].reshape(-1)[0])
        raise ValueError(f"`targets` holds the label {value}, outside [0, {num_classes}) and not ignore_index={ignore_index}")


def soft_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor | TopKLogits, temperature: float,
    *, divergence: str = "forward_kl", beta: float = 0.5,
) -> torch.Tensor:
    """``T^2 * D(p_student, p_teacher)`` at temperature ``T``, ``batchmean`` over every row.

    ``D`` is ``KL(p_teacher || p_student)`` by default (see :mod:`.divergences` for
    ``"reverse_kl"`` and ``"jsd"``). Logits are ``[..., V]``; each leading position is a sample.
    The teacher is a constant target (no gradient flows into it); it may be a :class:`TopKLogits`.
    Computed in float32 whatever the input dtype.

    >>> import torch
    >>> s = torch.randn(4, 10)
    >>> float(soft_kd_loss(s, s, temperature=4.0)) == 0.0
    True
    """
    return token_kd_losses(student_logits, teacher_logits, temperature, divergence=divergence, beta=beta)[0]


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


@torch.compiler.disable  # its fused gradient is one pass already; Dynamo cannot trace it (2.13 fails inside)
def token_kd_losses(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKLogits,
    temperature: float,
    *,
    targets: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    with_hard: bool = True,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Soft KD term and cross-entropy, both averaged over the valid positions of ``[..., V]`` logits.

    Returns ``(soft, hard)``, each differentiable: ``soft = T^2 * mean_valid D(p_s, p_t)`` (``D``
    the ``divergence``, forward KL ``KL(p_t || p_s)`` by default) and ``hard = mean_valid
    CE(student, targets)`` (``None`` without ``targets``). A position is valid when its target is
    not ``ignore_index`` and ``mask`` is non-zero there; for ``[B, C]`` logits with every target
    valid, ``soft`` is the ``batchmean`` divergence times ``T^2``. ``teacher_logits`` may be a
    :class:`TopKLogits`. When you only need ``alpha * soft + (1 - alpha) * hard``,
    :func:`token_kd_loss` is cheaper.

    Above ``chunk_size`` positions (default: ``DEFAULT_CHUNK_ELEMENTS // V``) the work runs chunk
    by chunk in forward *and* backward, so besides the gradient of the student logits (which any
    loss has) the extra peak memory is a few float32 chunks, not ``B*T*V``. Mathematically the
    chunked and the direct computation are the same.

    >>> import torch
    >>> s, t = torch.randn(2, 5, 7, requires_grad=True), torch.randn(2, 5, 7)
    >>> y = torch.randint(0, 7, (2, 5))
    >>> direct = token_kd_losses(s, t, 2.0, targets=y, chunk_size=100, divergence="jsd")
    >>> chunked = token_kd_losses(s, t, 2.0, targets=y, chunk_size=3, divergence="jsd")
    >>> all(torch.allclose(a, b) for a, b in zip(direct, chunked))
    True
    """
    args = _flat_kd_arguments(student_logits, teacher_logits, temperature, targets, mask, ignore_index, chunk_size, with_hard,
                              divergence, beta)
    soft, hard = _TokenKD.apply(*args, None, None)
    return soft, (hard if args[2] is not None else None)


@torch.compiler.disable  # its fused gradient is one pass already; Dynamo cannot trace it (2.13 fails inside)
def token_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopKLogits,
    temperature: float,
    alpha: float,
    *,
    targets: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    with_hard: bool = True,
    workspace: KDWorkspace | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(total, soft, hard)`` with ``total = alpha * soft + (1 - alpha) * hard`` differentiable.

    The same terms as :func:`token_kd_losses` (``soft`` and ``hard`` are returned detached, for
    logging), with one fused gradient: for the forward KL two exponentials per logit instead of the
    five to seven of ``log_softmax`` + ``kl_div`` + ``cross_entropy``, and one gradient buffer.
    Without ``targets`` (or with ``with_hard=False``: the targets then only mark ignored positions)
    ``hard`` is None and ``total`` is ``soft``. A :class:`KDWorkspace` reused across calls saves
    the temporaries' allocations.

    >>> import torch, torch.nn.functional as F
    >>> s, t, y = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10), torch.randint(0, 10, (4,))
    >>> total, soft, hard = token_kd_loss(s, t, 4.0, 0.9, targets=y)
    >>> torch.allclose(hard, F.cross_entropy(s, y)) and torch.allclose(total, 0.9 * soft + 0.1 * hard)
    True
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")
    args = _flat_kd_arguments(student_logits, teacher_logits, temperature, targets, mask, ignore_index, chunk_size, with_hard,
                              divergence, beta)
    has_hard = args[2] is not None
    mix = (float(alpha), 1.0 - float(alpha)) if has_hard else (1.0, 0.0)
    total, soft, hard = _TokenKD.apply(*args, mix, workspace)
    return total, soft, (hard if has_hard else None)


def _flat_kd_arguments(student_logits, teacher_logits, temperature, targets, mask, ignore_index, chunk_size, with_hard,
                       divergence, beta):
    """Validate and flatten to rows: (student ``[N, V]``, teacher ``[N, V]`` or TopKRows, targets or None, weights, SoftTerm, rows per chunk)."""
    soft_term = SoftTerm(check_temperature(temperature), *check_divergence(divergence, beta))
    if student_logits.dim() < 1:
        raise ValueError("`student_outputs` logits need a class dimension")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be an int >= 1 or None, got {chunk_size!r}")
    leading, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if isinstance(teacher_logits, TopKLogits):
        _check_top_k(teacher_logits, leading, vocab, soft_term.temperature)
    elif student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
            " (`student_outputs` / `teacher_outputs` must share batch, positions and vocabulary)"
        )
    if targets is not None:
        check_labels(targets, vocab, ignore_index)
    weights, _ = position_weights(leading, student_logits.device, targets, mask, ignore_index)
    student = student_logits.reshape(-1, vocab)
    if isinstance(teacher_logits, TopKLogits):
        if teacher_logits.counted is not None:
            _check_counted(teacher_logits.counted, weights)
        teacher = teacher_logits.rows(student.device)
    else:
        teacher = teacher_logits.detach().reshape(-1, vocab)
    flat_targets = None if targets is None or not with_hard else targets.reshape(-1).clamp(min=0)  # ignored rows weigh 0
    rows = max(1, DEFAULT_CHUNK_ELEMENTS // vocab) if chunk_size is None else chunk_size
    return student, teacher, flat_targets, weights, soft_term, rows


def _check_top_k(entry: TopKLogits, leading: torch.Size, vocab: int, temperature: float) -> None:
    if entry.shape != leading or (entry.vocab_size is not None and entry.vocab_size != vocab) or entry.top_k > vocab:
        raise ValueError(
            f"student logits of shape {tuple(leading) + (vocab,)} and the TopKLogits teacher for positions {tuple(entry.shape)} "
            f"(vocabulary {entry.vocab_size}, k={entry.top_k}) differ in shape: a cache written from other data?"
        )
    if entry.log_tail is not None and entry.top_k < vocab and entry.temperature != temperature:
        raise ValueError(
            f"`temperature`={temperature:g} differs from the temperature {entry.temperature:g} the cached tail mass was computed "
            "at: cache the teacher with the loss's temperature (only a cache of the whole vocabulary fits every temperature)"
        )


def _check_counted(counted: torch.Tensor, weights: torch.Tensor) -> None:
    missing = (weights > 0) & ~counted.reshape(-1).to(weights.device)
    if bool(missing.any()):
        raise ValueError(
            f"`teacher_outputs` holds no teacher logits at {int(missing.sum())} positions the loss counts (the cache skipped "
            "them as padding): it was written with another attention mask"
        )


class _TokenKD(torch.autograd.Function):
    """Soft term + CE over ``[N, V]`` rows with analytic gradients.

    ``mix=None``: outputs ``(soft, hard)``, both differentiable. ``mix=(a, b)``: outputs
    ``(total, soft, hard)`` with only ``total = a * soft + b * hard`` differentiable.
    One chunk: the gradients are computed with the loss and kept (their size is one chunk).
    More chunks: nothing of size ``N x V`` is kept; the backward recomputes chunk by chunk.
    The teacher (logits ``[N, V]`` or ``TopKRows``) carries no gradient.
    """

    @staticmethod
    def forward(ctx, student, teacher, targets, weights, soft_term, rows, mix, workspace):
        ctx.soft_term, ctx.rows, ctx.dtype, ctx.mix, ctx.workspace = soft_term, rows, student.dtype, mix, workspace
        ctx.single_chunk = student.shape[0] <= rows
        with _without_autocast(student.device.type):  # the math stays float32 under autocast
            soft, hard = _TokenKD._forward(ctx, student, teacher, targets, weights)
        if mix is None:
            return soft, hard
        ctx.mark_non_differentiable(soft, hard)
        return mix[0] * soft + mix[1] * hard, soft, hard

    @staticmethod
    def _forward(ctx, student, teacher, targets, weights):
        if ctx.single_chunk:
            soft, hard, grads = soft_hard_rows(student, teacher, targets, weights, ctx.soft_term, ctx.mix, workspace=ctx.workspace)
            ctx.save_for_backward(*grads)
            return soft, hard
        soft = torch.zeros((), dtype=torch.float32, device=student.device)
        hard = torch.zeros((), dtype=torch.float32, device=student.device)
        for chunk in _chunks(student.shape[0], ctx.rows):
            s, h, _ = soft_hard_rows(*_chunk_arguments(chunk, student, teacher, targets, weights), ctx.soft_term, ctx.mix, False,
                                     ctx.workspace)
            soft += s
            hard += h
        ctx.save_for_backward(student, targets, weights)
        ctx.teacher = teacher  # logits or TopKRows: an input without gradient, kept as it is
        return soft, hard

    @staticmethod
    def backward(ctx, *grad_outputs):
        scales = grad_outputs[:2] if ctx.mix is None else grad_outputs[:1]
        if ctx.single_chunk:
            return _combine(ctx.saved_tensors, scales, ctx.dtype), None, None, None, None, None, None, None
        student, targets, weights = ctx.saved_tensors
        grad = torch.empty_like(student)
        with _without_autocast(student.device.type):
            for chunk in _chunks(student.shape[0], ctx.rows):
                _, _, grads = soft_hard_rows(*_chunk_arguments(chunk, student, ctx.teacher, targets, weights), ctx.soft_term,
                                             ctx.mix, workspace=ctx.workspace)
                grad[chunk] = _combine(grads, scales, ctx.dtype)
        return grad, None, None, None, None, None, None, None


def _chunks(count: int, rows: int) -> list[slice]:
    return [slice(start, start + rows) for start in range(0, count, rows)]


def _chunk_arguments(chunk: slice, student, teacher, targets, weights):
    teacher = type(teacher)(*(None if t is None else t[chunk] for t in teacher)) if isinstance(teacher, tuple) else teacher[chunk]
    return student[chunk], teacher, None if targets is None else targets[chunk], weights[chunk]


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
