"""``DistillationLoss``: wrap the loss you already have with a frozen teacher's soft targets."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn

from .cache import TopKLogits, inputs_fingerprint
from .divergences import check_divergence
from .losses import KDWorkspace, check_temperature, token_kd_loss

__all__ = ["DistillationLoss", "extract_logits", "extract_loss", "is_label_tensor", "trainable_leaves"]


def extract_logits(outputs: Any, argument: str = "student_outputs") -> torch.Tensor:
    """The logits inside a model's outputs: a tensor, ``.logits``, a dict's ``"logits"``, a tuple's first item.

    >>> import torch
    >>> extract_logits({"logits": torch.zeros(2)}).shape
    torch.Size([2])
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, Mapping):
        if isinstance(outputs.get("logits"), torch.Tensor):
            return outputs["logits"]
        for value in outputs.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return value
    if isinstance(outputs, (tuple, list)) and outputs:
        return extract_logits(outputs[0], argument)
    raise TypeError(
        f"`{argument}` must be logits: a tensor, an object with `.logits`, a dict with 'logits' or a tuple "
        f"whose first item is the logits; got {type(outputs).__name__}"
    )


def is_label_tensor(targets: Any, leading_shape: torch.Size) -> bool:
    """Whether ``targets`` are class labels for logits ``[*leading_shape, V]``: integers of exactly that shape.

    >>> import torch
    >>> is_label_tensor(torch.tensor([1, 0]), torch.Size([2])), is_label_tensor(torch.randn(2, 4), torch.Size([2]))
    (True, False)
    """
    return (
        isinstance(targets, torch.Tensor)
        and not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
        and targets.shape == leading_shape
    )


def trainable_leaves(output: torch.Tensor) -> set[int]:
    """The ids of the leaf tensors that receive gradients through ``output``'s autograd graph.

    >>> import torch.nn as nn
    >>> layer = nn.Linear(2, 2)
    >>> trainable_leaves(layer(torch.ones(1, 2))) == {id(layer.weight), id(layer.bias)}
    True
    """
    found: set[int] = set()
    seen: set[Any] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf that gets a .grad
        if isinstance(variable, torch.Tensor):
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def extract_loss(outputs: Any) -> torch.Tensor | None:
    """A scalar ``.loss`` carried by the outputs (Transformers models given ``labels``), else None."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.dim() == 0 else None


class DistillationLoss(nn.Module):
    """``alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * base_loss``, the teacher run for you.

    >>> import torch, torch.nn as nn
    >>> teacher, student = nn.Linear(8, 4), nn.Linear(8, 4)
    >>> distill = DistillationLoss(teacher, temperature=4.0, alpha=0.9)
    >>> x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    >>> loss = distill(student(x), y, inputs=x)   # the teacher runs on `inputs` under no_grad
    >>> loss.backward()
    >>> sorted(distill.log_values())
    ['hard', 'soft', 'total']
    >>> teacher.weight.grad is None and student.weight.grad is not None
    True

    Args:
        teacher: the trained model. It is kept in eval mode, run under ``no_grad``, moved to the
            student's device on first use and frozen (``requires_grad=False``) on the first call
            with a graph, after checking that it shares no trainable parameter with the student (a
            student built from the teacher's own modules is refused: freezing would freeze it too). It is *not* a
            registered submodule: ``parameters()``, ``state_dict()`` and ``.train()`` of this loss
            (or of anything it is put in) never see it, so it cannot reach an optimizer, a DDP
            wrapper or a checkpoint of the student.
        base_loss: ``base_loss(student_logits, targets) -> scalar`` for the hard term, given
            ``targets`` untouched (regression values, embeddings); default cross-entropy over the
            valid positions (``ignore_index`` and padding excluded). Integer ``targets`` of the
            logits' leading shape are labels: they also mark the positions the soft term counts.
        temperature: softening temperature, finite, in ``(0, 1e6]`` (above 32 computed in float64).
        alpha: weight of the soft term in ``[0, 1]``; the hard term gets ``1 - alpha``.
        divergence: the soft term's ``D``: ``"forward_kl"`` ``KL(p_t || p_s)`` (default),
            ``"reverse_kl"`` ``KL(p_s || p_t)`` or ``"jsd"``, ``beta * KL(p_t || m) + (1 - beta) *
            KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``; always times ``T^2``.
        beta: the teacher's weight in the JSD mixture, in (0, 1).
        ignore_index: target value that carries no loss (token-level logits), default -100.
        shift_labels: for causal LMs given the input ids as ``targets`` (Transformers' ``labels``):
            compare the logits at position ``t`` with the target at ``t + 1``.
        chunk_size: positions processed at once by the token-level loss (default: about 2M logits).
        use_output_loss: when ``targets`` is None and the student's outputs carry ``.loss``
            (a Transformers model given ``labels``), use it as the hard term.

    Call: ``distill(student_outputs, targets=None, inputs=None, teacher_outputs=None,
    attention_mask=None)``. The teacher runs on ``inputs`` (a dict is passed as keyword arguments,
    without its ``labels``) unless ``teacher_outputs`` is given: logits, outputs holding them, or a
    :class:`~compress_callbacks.distillation.TopKLogits` from ``cache_teacher_logits`` (then
    ``teacher=None`` will do, and ``inputs``, when given, is checked against the cached entry's). Without a hard term
    (``targets=None`` and no ``.loss``) the result is the soft term alone. Logits of shape
    ``[B, T, V]`` average over the positions whose target is not ``ignore_index`` and whose
    ``attention_mask`` (argument, or ``inputs["attention_mask"]``) is non-zero.

    ``log_values()`` gives the last ``hard``/``soft``/``total`` as floats; pass the loss to
    ``CompressionManager.register_loss`` to have them logged with the rest.
    """

    def __init__(
        self,
        teacher: nn.Module | Callable[..., Any] | None,
        base_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        temperature: float = 4.0,
        alpha: float = 0.9,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        *,
        ignore_index: int = -100,
        shift_labels: bool = False,
        chunk_size: int | None = None,
        use_output_loss: bool = True,
    ) -> None:
        super().__init__()
        if teacher is not None and not callable(teacher):
            raise TypeError(f"`teacher` must be an nn.Module or a callable (or None with teacher_outputs), got {type(teacher).__name__}")
        if base_loss is not None and not callable(base_loss):
            raise TypeError(f"`base_loss` must be callable(logits, targets), got {type(base_loss).__name__}")
        check_temperature(temperature)
        divergence, beta = check_divergence(divergence, beta)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")
        if not isinstance(ignore_index, int):
            raise TypeError(f"`ignore_index` must be an int, got {ignore_index!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"`chunk_size` must be an int >= 1 or None, got {chunk_size!r}")
        if isinstance(teacher, nn.Module):
            teacher.eval()  # frozen on the first call that builds a graph, once it shares nothing trainable
        # a plain tuple attribute: nn.Module does not register it, so the teacher stays out of
        # parameters(), state_dict(), .train() and .to() of this loss and of any parent module.
        self._teacher_ref = (teacher,)
        self._teacher_device: torch.device | None = None
        self._teacher_checked = not isinstance(teacher, nn.Module)
        self.base_loss = base_loss
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.divergence = divergence
        self.beta = beta
        self.ignore_index = ignore_index
        self.shift_labels = bool(shift_labels)
        self.chunk_size = chunk_size
        self.use_output_loss = bool(use_output_loss)
        self._last: dict[str, torch.Tensor] = {}
        self._workspace = KDWorkspace()

    @property
    def teacher(self) -> Any:
        """The frozen teacher (not a submodule of this loss)."""
        return self._teacher_ref[0]

    def extra_repr(self) -> str:
        extra = f", divergence={self.divergence!r}" + (f", beta={self.beta}" if self.divergence == "jsd" else "")
        return f"teacher={type(self.teacher).__name__}, temperature={self.temperature}, alpha={self.alpha}{extra}"

    # ------------------------------------------------------------------ teacher
    def teacher_outputs(self, inputs: Any, like: torch.Tensor) -> Any:
        """Run the teacher on ``inputs`` the way the student ran: its device, no_grad, eval, autocast."""
        teacher = self.teacher
        if teacher is None:
            raise ValueError("`teacher_outputs` is required when the DistillationLoss was built with teacher=None")
        if inputs is None:
            raise ValueError("`inputs` (what the teacher runs on) or `teacher_outputs` is required")
        if isinstance(teacher, nn.Module):
            if self._teacher_device != like.device:
                teacher.to(like.device)
                self._teacher_device = like.device
            if teacher.training:
                teacher.eval()
        device_type = like.device.type
        autocast_dtype = None
        if like.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(device_type):
            # Accelerate autocasts only the student's forward; run the teacher in the same precision.
            autocast_dtype = like.dtype
        precision = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
        with torch.no_grad(), precision:
            if isinstance(inputs, Mapping):
                return teacher(**{k: v for k, v in inputs.items() if k != "labels"})
            return teacher(inputs)

    def _freeze_teacher(self, student_logits: torch.Tensor) -> None:
        """Freeze the teacher unless it shares a trainable parameter with the student (then refuse, freezing nothing).

        The student's trainable parameters are the leaves of the graph behind its logits; a teacher
        parameter among them would be frozen for the student too, and silently stop training.
        """
        teacher = self.teacher
        shared = trainable_leaves(student_logits)
        names = [name for name, parameter in teacher.named_parameters() if id(parameter) in shared]
        if names:
            listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise ValueError(
                f"`teacher` shares trainable parameters with the student ({listed}); freezing the teacher would freeze "
                "them in the student too. Give the student its own copy (copy.deepcopy) or freeze the shared part yourself"
            )
        teacher.requires_grad_(False)
        self._teacher_checked = True

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        student_outputs: Any,
        targets: torch.Tensor | None = None,
        inputs: Any = None,
        teacher_outputs: Any = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        student_logits = extract_logits(student_outputs, "student_outputs")
        if not self._teacher_checked and student_logits.grad_fn is not None:
            self._freeze_teacher(student_logits)
        if teacher_outputs is None:
            teacher_outputs = self.teacher_outputs(inputs, student_logits)
        teacher_logits = self._checked_teacher_logits(teacher_outputs, student_logits, inputs)
        # targets are class labels (they mark the counted positions) only when integer and of the logits' leading shape;
        # anything else (regression values, embeddings) goes to `base_loss` untouched
        labels = targets if is_label_tensor(targets, student_logits.shape[:-1]) else None
        if targets is not None and labels is None and self.base_loss is None:
            raise ValueError(
                f"`targets` of dtype {targets.dtype} and shape {tuple(targets.shape)} are not class labels of shape "
                f"{tuple(student_logits.shape[:-1])} for the default cross-entropy: pass `base_loss=` for other targets"
            )
        if attention_mask is None and isinstance(inputs, Mapping) and student_logits.dim() == 3:
            attention_mask = inputs.get("attention_mask")
        if self.shift_labels:
            if student_logits.dim() != 3:
                raise ValueError("`shift_labels=True` needs token-level logits [B, T, V]")
            if targets is not None and labels is None:
                raise ValueError("`shift_labels=True` needs integer labels [B, T] as `targets`")
            student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
            targets = labels = None if targets is None else targets[:, 1:]
            attention_mask = None if attention_mask is None else attention_mask[:, 1:]

        fused_hard = self.base_loss is None and labels is not None  # default cross-entropy: one fused pass for both terms
        total, soft, hard = token_kd_loss(
            student_logits, teacher_logits, self.temperature, self.alpha if fused_hard else 1.0,
            targets=labels, mask=attention_mask, ignore_index=self.ignore_index, chunk_size=self.chunk_size,
            with_hard=fused_hard, workspace=self._workspace, divergence=self.divergence, beta=self.beta,
        )
        if not fused_hard:
            if targets is not None:
                hard = self.base_loss(student_logits, targets)
            elif self.use_output_loss:
                hard = extract_loss(student_outputs)
            if hard is not None:
                total = self.alpha * total + (1.0 - self.alpha) * hard
        self._last = {"soft": soft.detach(), "total": total.detach()}
        if hard is not None:
            self._last["hard"] = hard.detach()
        return total

    @staticmethod
    def _checked_teacher_logits(teacher_outputs: Any, student_logits: torch.Tensor, inputs: Any) -> torch.Tensor | TopKLogits:
        """The teacher's logits (or cached top-k entry), refused when they do not fit the student's or its inputs."""
        if not isinstance(teacher_outputs, TopKLogits):
            teacher_logits = extract_logits(teacher_outputs, "teacher_outputs")
            if student_logits.shape != teacher_logits.shape:
                raise ValueError(
                    f"`student_outputs` logits and `teacher_outputs` logits differ in shape: {tuple(student_logits.shape)} vs "
                    f"{tuple(teacher_logits.shape)} (batch, positions and vocabulary must match)"
                )
            return teacher_logits
        entry = teacher_outputs
        if entry.shape != student_logits.shape[:-1] or entry.vocab_size not in (None, student_logits.shape[-1]):
            raise ValueError(
                f"`student_outputs` logits of shape {tuple(student_logits.shape)} and the cached `teacher_outputs` for positions "
                f"{tuple(entry.shape)} (vocabulary {entry.vocab_size}) differ in shape: a cache written from other data?"
            )
        if entry.fingerprint is not None and inputs is not None and inputs_fingerprint(inputs) != entry.fingerprint:
            raise ValueError(
                "`teacher_outputs` was cached from other inputs than `inputs` (their fingerprints differ): pair each batch with "
                "its own entry (same order, no shuffling: `cache.zip(batches)`) and pass as `inputs` what the teacher ran on"
            )
        return entry

    def log_values(self) -> dict[str, float]:
        """The last call's ``hard`` (when there was one), ``soft`` and ``total`` as floats."""
        return {key: float(value) for key, value in self._last.items()}
