"""``DistillationLoss``: wrap the loss you already have with a frozen teacher's soft targets."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn

from .losses import KDWorkspace, check_temperature, token_kd_loss

__all__ = ["DistillationLoss", "extract_logits", "extract_loss"]


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
        teacher: the trained model. It is frozen (``requires_grad=False``), kept in eval mode, run
            under ``no_grad`` and moved to the student's device on first use. It is *not* a
            registered submodule: ``parameters()``, ``state_dict()`` and ``.train()`` of this loss
            (or of anything it is put in) never see it, so it cannot reach an optimizer, a DDP
            wrapper or a checkpoint of the student.
        base_loss: ``base_loss(student_logits, targets) -> scalar`` for the hard term; default
            cross-entropy over the valid positions (``ignore_index`` and padding excluded).
        temperature: softening temperature ``T > 0``.
        alpha: weight of the soft term in ``[0, 1]``; the hard term gets ``1 - alpha``.
        ignore_index: target value that carries no loss (token-level logits), default -100.
        shift_labels: for causal LMs given the input ids as ``targets`` (Transformers' ``labels``):
            compare the logits at position ``t`` with the target at ``t + 1``.
        chunk_size: positions processed at once by the token-level loss (default: about 2M logits).
        use_output_loss: when ``targets`` is None and the student's outputs carry ``.loss``
            (a Transformers model given ``labels``), use it as the hard term.

    Call: ``distill(student_outputs, targets=None, inputs=None, teacher_outputs=None,
    attention_mask=None)``. The teacher runs on ``inputs`` (a dict is passed as keyword arguments,
    without its ``labels``) unless ``teacher_outputs`` is given. Without a hard term
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
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"`alpha` must be a number in [0, 1], got {alpha!r}")
        if not isinstance(ignore_index, int):
            raise TypeError(f"`ignore_index` must be an int, got {ignore_index!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"`chunk_size` must be an int >= 1 or None, got {chunk_size!r}")
        if isinstance(teacher, nn.Module):
            teacher.requires_grad_(False)
            teacher.eval()
        # a plain tuple attribute: nn.Module does not register it, so the teacher stays out of
        # parameters(), state_dict(), .train() and .to() of this loss and of any parent module.
        self._teacher_ref = (teacher,)
        self._teacher_device: torch.device | None = None
        self.base_loss = base_loss
        self.temperature = float(temperature)
        self.alpha = float(alpha)
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
        return f"teacher={type(self.teacher).__name__}, temperature={self.temperature}, alpha={self.alpha}"

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
        if teacher_outputs is None:
            teacher_outputs = self.teacher_outputs(inputs, student_logits)
        teacher_logits = extract_logits(teacher_outputs, "teacher_outputs")
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"`student_outputs` logits {tuple(student_logits.shape)} and `teacher_outputs` logits "
                f"{tuple(teacher_logits.shape)} differ (batch, positions and vocabulary must match)"
            )
        if attention_mask is None and isinstance(inputs, Mapping) and student_logits.dim() == 3:
            attention_mask = inputs.get("attention_mask")
        if self.shift_labels:
            if student_logits.dim() != 3:
                raise ValueError("`shift_labels=True` needs token-level logits [B, T, V]")
            student_logits, teacher_logits = student_logits[:, :-1], teacher_logits[:, :-1]
            targets = None if targets is None else targets[:, 1:]
            attention_mask = None if attention_mask is None else attention_mask[:, 1:]

        fused_hard = self.base_loss is None and targets is not None  # default cross-entropy: one fused pass for both terms
        total, soft, hard = token_kd_loss(
            student_logits, teacher_logits, self.temperature, self.alpha if fused_hard else 1.0,
            targets=targets, mask=attention_mask, ignore_index=self.ignore_index, chunk_size=self.chunk_size,
            with_hard=fused_hard, workspace=self._workspace,
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

    def log_values(self) -> dict[str, float]:
        """The last call's ``hard`` (when there was one), ``soft`` and ``total`` as floats."""
        return {key: float(value) for key, value in self._last.items()}
