"""The soft term's row math: forward KL, reverse KL or generalized JSD, over full or cached top-k logits.

With ``p`` the student's and ``q`` the teacher's softmax at temperature ``T``, the soft term of one
position is ``T^2 * D(p, q)`` where ``D`` is

- ``"forward_kl"``: ``KL(q || p)`` (the classic KD term, mass-covering);
- ``"reverse_kl"``: ``KL(p || q)`` (mode-seeking);
- ``"jsd"``: ``beta * KL(q || m) + (1 - beta) * KL(p || m)`` with ``m = beta * q + (1 - beta) * p``,
  ``beta`` in (0, 1) (the generalized JSD of on-policy GKD, as in TRL).

:func:`divergence_rows` is the math itself, over log-probabilities, with its gradient. The row
kernels below apply it to ``[N, V]`` logits in one pass with analytic gradients (the autograd
function in :mod:`.losses` chunks them): full teacher logits, or a teacher known only by its
top-k logits and the log of its tail mass (:class:`TopKRows`), where the two distributions are
compared over ``k + 1`` outcomes: the ``k`` cached tokens and "any other token".

>>> import torch
>>> log_p, log_q = torch.log_softmax(torch.tensor([[1.0, 0.0, -1.0]]), -1), torch.log_softmax(torch.tensor([[2.0, 0.0, -2.0]]), -1)
>>> [round(float(divergence_rows(log_p, log_q, d)[0]), 4) for d in ("forward_kl", "reverse_kl", "jsd")]
[0.1156, 0.1601, 0.0324]
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "DIVERGENCES",
    "FLOAT64_ABOVE_TEMPERATURE",
    "MAX_TEMPERATURE",
    "KDWorkspace",
    "SoftTerm",
    "TopKRows",
    "check_divergence",
    "check_temperature",
    "divergence_rows",
    "soft_hard_rows",
]

LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
#: Default number of logits (rows x vocabulary) processed at once by the chunked token loss.
DEFAULT_CHUNK_ELEMENTS = 1 << 21
#: Above this temperature the row math runs in float64: in float32 the soft term, O(1/T^2) per
#: position, drowns in the rounding of the O(1) log-normalisers it is the difference of.
FLOAT64_ABOVE_TEMPERATURE = 32.0
#: The largest accepted temperature: beyond it even float64 loses the soft term (its T -> inf limit
#: is half the variance of the logit difference: match logits with an MSE instead).
MAX_TEMPERATURE = 1e6


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float, or ValueError unless it is a finite number in ``(0, MAX_TEMPERATURE]``."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature <= MAX_TEMPERATURE:
        raise ValueError(f"`temperature` must be a finite number in (0, {MAX_TEMPERATURE:g}], got {temperature!r}")
    return float(temperature)


def check_divergence(divergence: str, beta: float) -> tuple[str, float]:
    """``(divergence, beta)`` validated: a name in :data:`DIVERGENCES`, ``beta`` a number in (0, 1)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {', '.join(map(repr, DIVERGENCES))}, got {divergence!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 < beta < 1.0:
        raise ValueError(f"`beta` must be a number in (0, 1) (the teacher's weight in the JSD mixture), got {beta!r}")
    return divergence, float(beta)


class SoftTerm(NamedTuple):
    """What the soft term computes: the temperature, the divergence and the JSD's ``beta``.

    >>> SoftTerm(2.0, "jsd", beta=0.1)
    SoftTerm(temperature=2.0, divergence='jsd', beta=0.1)
    """

    temperature: float
    divergence: str = "forward_kl"
    beta: float = 0.5


class TopKRows(NamedTuple):
    """A teacher known by rows of its top-k logits: ``values``/``indices`` ``[N, k]``, ``log_tail`` ``[N]`` or None.

    >>> import torch
    >>> values, indices = torch.randn(3, 20).topk(4)
    >>> rows = TopKRows(values, indices, log_tail=None)
    >>> rows.values.shape, rows.log_tail is None
    (torch.Size([3, 4]), True)

    ``log_tail`` is ``log sum exp(logit / T)`` over the other vocabulary entries, in the same per-row
    shift as ``values``; None means the teacher puts no mass outside the ``k`` entries.
    """

    values: torch.Tensor
    indices: torch.Tensor
    log_tail: torch.Tensor | None


def divergence_rows(
    log_p: torch.Tensor, log_q: torch.Tensor, divergence: str = "forward_kl", beta: float = 0.5,
    *, p: torch.Tensor | None = None, q: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``D(p, q)`` per row of log-probabilities ``[N, C]`` and its gradient with respect to ``log_p``.

    Returns ``(rows [N], grad [N, C])`` where ``grad = dD / d log p`` with each ``log p`` entry
    taken as a free variable (the gradient with respect to the logits ``z`` of ``p = softmax(z)``
    is then ``grad - p * grad.sum(-1)``). Outcomes where a distribution is exactly 0 contribute
    ``0 * log 0 = 0``. ``p``/``q`` may be passed when already computed (``exp`` of the log-probs).

    >>> import torch
    >>> log_p = torch.log_softmax(torch.randn(3, 5), -1)
    >>> rows, grad = divergence_rows(log_p, log_p, "jsd", 0.3)
    >>> float(rows.abs().max()) < 1e-6 and float(grad.abs().max()) < 1e-6
    True
    """
    p = log_p.exp() if p is None else p
    q = log_q.exp() if q is None else q
    if divergence == "forward_kl":  # sum q (log q - log p); d/d log p = -q
        return _weighted(q, torch.sub(log_q, log_p)).sum(-1), q.neg()
    if divergence == "reverse_kl":  # sum p (log p - log q); d/d log p = p (log p - log q) (+ p, which softmax cancels)
        terms = _weighted(p, torch.sub(log_p, log_q))
        return terms.sum(-1), terms
    # jsd: beta sum q (log q - log m) + (1 - beta) sum p (log p - log m); d/d log p = (1 - beta) p (log p - log m)
    log_m = torch.mul(q, beta).add_(p, alpha=1.0 - beta).clamp_min_(torch.finfo(p.dtype).tiny).log_()  # both underflowed: m = tiny
    student_terms = _weighted(p, torch.sub(log_p, log_m))
    teacher_terms = _weighted(q, log_m.neg_().add_(log_q))
    rows = teacher_terms.sum(-1).mul_(beta).add_(student_terms.sum(-1), alpha=1.0 - beta)
    return rows, student_terms.mul_(1.0 - beta)


def _weighted(probabilities: torch.Tensor, log_ratio: torch.Tensor) -> torch.Tensor:
    """``probabilities * log_ratio`` in ``log_ratio``'s buffer, with ``0 * log 0 = 0`` (an infinite ratio where the weight is 0)."""
    return log_ratio.mul_(probabilities).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)


# ---------------------------------------------------------------------------- scratch and exponentials
class KDWorkspace:
    """Reusable scratch buffers for the KD row math, grown on demand (one per slot, device and dtype).

    >>> import torch
    >>> workspace = KDWorkspace()
    >>> a = workspace.get(0, torch.Size([4, 8]), torch.device("cpu"))
    >>> workspace.get(0, torch.Size([2, 8]), torch.device("cpu")).data_ptr() == a.data_ptr()
    True

    Fresh ``N x V`` temporaries cost page faults on every call on CPU (large blocks go back to the
    OS when freed); a ``DistillationLoss`` keeps one workspace, so only the gradient is new memory.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, slot: int, shape: torch.Size, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        key = (slot, device, dtype)
        buffer, view = self._buffers.get(key, (None, None))
        if view is not None and view.shape == shape:
            return view
        numel = shape.numel()
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
        view = buffer[:numel].view(shape)
        self._buffers[key] = (buffer, view)
        return view


def _scratch(workspace: KDWorkspace | None, slot: int, like: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if workspace is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    return workspace.get(slot, like.shape, like.device, dtype)


def _compute_dtype(temperature: float) -> torch.dtype:
    return torch.float64 if temperature > FLOAT64_ABOVE_TEMPERATURE else torch.float32


def _exp_rows(logits: torch.Tensor, scale: float, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``out = exp(scale * (x - max x))`` in ``out``'s dtype, the row max of ``scale * x`` **in log2 units**, the row sums.

    Computed as ``exp2`` of ``log2(e) * scale * (x - max x)`` (on CPU ``exp2`` is about 3x faster
    than ``exp``), the shift and scale in one pass. The natural-log row max is ``LN_2 * top2``.
    """
    scale2 = scale * LOG2_E
    top2 = logits.amax(-1, keepdim=True).to(out.dtype).mul_(scale2)
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


# ---------------------------------------------------------------------------- row kernels
def soft_hard_rows(
    student: torch.Tensor,
    teacher: torch.Tensor | TopKRows,
    targets: torch.Tensor | None,
    weights: torch.Tensor,
    soft: SoftTerm,
    mix: tuple[float, float] | None,
    need_grads: bool = True,
    workspace: KDWorkspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Over rows of ``[N, V]`` student logits: the weighted sums of ``T^2 * D`` and CE, and their gradients.

    ``weights`` ``[N]`` weigh the rows (``valid / count``). Gradients: ``[soft, hard]`` separately
    (``mix=None``; ``hard`` None without ``targets``) or the single ``a * soft + b * hard`` for
    ``mix=(a, b)``. The math runs in float32 (float64 above ``FLOAT64_ABOVE_TEMPERATURE``); the
    sums come back as float32. Entries of ``-inf`` in both distributions weigh nothing.
    """
    if isinstance(teacher, TopKRows):
        return _topk_rows(student, teacher, targets, weights, soft, mix, need_grads, workspace)
    if soft.divergence == "forward_kl":
        return _forward_kl_rows(student, teacher, targets, weights, soft.temperature, mix, need_grads, workspace)
    return _full_rows(student, teacher, targets, weights, soft, mix, need_grads, workspace)


def _forward_kl_rows(student, teacher, targets, weights, temperature, mix, need_grads, workspace):
    """Forward KL over full logits, fused with the CE: two exponentials per logit for both terms.

    With ``z_s = s / T``: ``KL_row = sum_j p_t,j (z_t,j - z_s,j) + lse(z_s) - lse(z_t)``,
    ``d(T^2 KL)/ds = T (p_s - p_t)``, ``CE_row = lse(s) - s_y``, ``dCE/ds = softmax(s) - onehot``.
    For an integer ``T``, ``exp(s - max s) = exp(z_s - max z_s)^T``. Only the returned gradients
    are new memory when a ``workspace`` is given.
    """
    T = temperature
    dtype = _compute_dtype(T)
    weights = weights.to(dtype)
    e_s, top2_s, sum_s = _exp_rows(student, 1.0 / T, torch.empty(student.shape, dtype=dtype, device=student.device))
    e_t, top2_t, sum_t = _exp_rows(teacher, 1.0 / T, _scratch(workspace, 0, teacher, dtype))  # p_t = e_t / sum_t
    diff = _scratch(workspace, 1, teacher, dtype)
    if teacher.dtype == student.dtype == dtype:
        torch.sub(teacher, student, out=diff)
    else:
        diff.copy_(teacher).sub_(student)
    # KL_row = sum_j p_t (t - s) / T + lse(z_s) - lse(z_t), with lse(z) = LN_2 * top2 + log(sum);
    # nansum: an entry of -inf in both has p_t = 0 and t - s = nan, and weighs nothing
    kl_rows = diff.mul_(e_t).nansum(-1, keepdim=True).div_(sum_t * T).add_(top2_s - top2_t, alpha=LN_2).add_(sum_s.div(sum_t).log_())
    soft = torch.dot(kl_rows.view(-1), weights) * T**2
    hard, e_1, sum_1 = _hard_rows(student, targets, weights, T, e_s, top2_s, sum_s, workspace)
    soft, hard = soft.float(), hard.float()
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


def _full_rows(student, teacher, targets, weights, soft_term, mix, need_grads, workspace):
    """Reverse KL or JSD over full logits: :func:`divergence_rows` on the log-softmaxes, analytic gradient."""
    T = soft_term.temperature
    dtype = _compute_dtype(T)
    weights = weights.to(dtype)
    e_s, top2_s, sum_s = _exp_rows(student, 1.0 / T, torch.empty(student.shape, dtype=dtype, device=student.device))
    e_t, top2_t, sum_t = _exp_rows(teacher, 1.0 / T, _scratch(workspace, 0, teacher, dtype))
    log_p = torch.add(-(top2_s * LN_2 + sum_s.log()), student, alpha=1.0 / T, out=_scratch(workspace, 1, student, dtype))
    log_q = torch.add(-(top2_t * LN_2 + sum_t.log()), teacher, alpha=1.0 / T, out=_scratch(workspace, 3, teacher, dtype))
    p = torch.div(e_s, sum_s)
    rows, grad_log_p = divergence_rows(log_p, log_q, soft_term.divergence, soft_term.beta, p=p, q=e_t.div_(sum_t))
    soft = torch.dot(rows, weights) * T**2
    hard, e_1, sum_1 = _hard_rows(student, targets, weights, T, e_s, top2_s, sum_s, workspace)
    soft, hard = soft.float(), hard.float()
    if not need_grads:
        return soft, hard, []
    w = weights[:, None]
    # d(T^2 D)/ds = T (g - p sum g) for g = dD/dlog p
    grad_soft = p.mul_(grad_log_p.sum(-1, keepdim=True)).neg_().add_(grad_log_p).mul_(w * T)
    return soft, hard, _with_hard_gradient(grad_soft, targets, e_1, sum_1, w, mix)


def _topk_rows(student, teacher: TopKRows, targets, weights, soft_term, mix, need_grads, workspace):
    """Any divergence against a top-k teacher: over the ``k`` cached tokens plus one bucket for the rest.

    The student's log-probabilities of the buckets are its log-softmax at the ``k`` indices and
    ``log(sum of the others' probabilities)``; the teacher's are its ``k`` values and its tail,
    normalised together. The gradient through the tail bucket spreads over the other tokens in
    proportion to the student's probabilities. One exponential per student logit.
    """
    T = soft_term.temperature
    dtype = _compute_dtype(T)
    weights = weights.to(dtype)
    index = teacher.indices
    e_s, top2_s, sum_s = _exp_rows(student, 1.0 / T, torch.empty(student.shape, dtype=dtype, device=student.device))
    picked = e_s.gather(1, index)
    tail_s = e_s.scatter_(1, index, 0.0).sum(-1, keepdim=True)  # summed without the k entries: no cancellation
    e_s.scatter_(1, index, picked)
    log_sum_s = sum_s.log()
    log_p = torch.cat([student.gather(1, index).to(dtype).div_(T).sub_(top2_s * LN_2 + log_sum_s), tail_s.log() - log_sum_s], 1)
    values = teacher.values.to(dtype) / T
    if teacher.log_tail is None:
        log_tail = values.new_full((values.shape[0], 1), float("-inf"))
    else:
        log_tail = teacher.log_tail.to(dtype)[:, None]
    log_q = torch.cat([values, log_tail], 1)
    log_q -= torch.logaddexp(torch.logsumexp(values, -1, keepdim=True), log_tail)
    rows, grad_log_p = divergence_rows(log_p, log_q, soft_term.divergence, soft_term.beta)
    counted = weights > 0  # uncounted rows (a cache's placeholders at padding) weigh nothing, even where infinite
    soft = torch.dot(rows.where(counted, 0.0), weights) * T**2
    hard, e_1, sum_1 = _hard_rows(student, targets, weights, T, e_s, top2_s, sum_s, workspace)
    soft, hard = soft.float(), hard.float()
    if not need_grads:
        return soft, hard, []
    w = weights[:, None]
    k = index.shape[1]
    grad_log_p = grad_log_p.where(counted[:, None], 0.0)
    total = grad_log_p.sum(-1, keepdim=True)
    # other tokens: g_tail * p_j / P_tail - p_j * sum g; the k tokens: g_j - p_j * sum g
    per_tail = grad_log_p[:, k:] / tail_s.clamp_min(torch.finfo(dtype).tiny) - total / sum_s
    grad_soft = torch.mul(e_s, per_tail)
    grad_soft.scatter_(1, index, grad_log_p[:, :k] - picked * (total / sum_s))
    grad_soft.mul_(w * T)
    return soft, hard, _with_hard_gradient(grad_soft, targets, e_1, sum_1, w, mix)


def _hard_rows(student, targets, weights, T, e_s, top2_s, sum_s, workspace):
    """The weighted CE sum and what its gradient needs (``exp(s - max s)`` and its row sums), from ``e_s`` when it can."""
    if targets is None:
        return weights.new_zeros(()), None, None
    if T == 1.0:
        e_1, top2_1, sum_1 = e_s, top2_s, sum_s
    elif T.is_integer() and T <= 16:  # exp(s - max s) = exp(z_s - max z_s) ** T
        e_1 = _integer_power(e_s, int(T), _scratch(workspace, 2, student, e_s.dtype))
        top2_1, sum_1 = top2_s * T, e_1.sum(-1, keepdim=True)
    else:
        e_1, top2_1, sum_1 = _exp_rows(student, 1.0, _scratch(workspace, 2, student, e_s.dtype))
    ce_rows = sum_1.log().add_(top2_1, alpha=LN_2).sub_(student.gather(1, targets[:, None]))  # lse(s) - s_y
    return torch.dot(ce_rows.view(-1), weights), e_1, sum_1


def _with_hard_gradient(grad_soft, targets, e_1, sum_1, w, mix):
    """``[grad_soft, grad_hard]`` (``mix=None``) or ``[a * grad_soft + b * grad_hard]``; ``grad_hard = w (softmax - onehot)``."""
    if mix is None:
        grad_hard = None
        if targets is not None:
            grad_hard = torch.mul(e_1, w / sum_1).scatter_add_(1, targets[:, None], -w)
        return [grad_soft, grad_hard]
    a, b = mix
    grad = grad_soft.mul_(a)
    if b and targets is not None:
        grad.addcmul_(e_1, w * b / sum_1).scatter_add_(1, targets[:, None], w * -b)
    return [grad]
