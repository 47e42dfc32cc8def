"""torchmetrics ``Metric``s for compressed training: teacher-student agreement and weight sparsity.

Both keep their state as sums (``dist_reduce_fx="sum"``), so ``compute()`` gives the same,
all-rank answer on every DDP rank.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics import Metric

from .targets import ModuleSpec, normalize_spec, select_modules

__all__ = ["Sparsity", "TeacherStudentAgreement"]


class TeacherStudentAgreement(Metric):
    """Top-1 agreement and mean ``KL(p_teacher || p_student)`` per sample, over ``[..., V]`` logits.

    >>> import torch
    >>> agreement = TeacherStudentAgreement()
    >>> student, teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> agreement.update(student, teacher)
    >>> float(agreement.compute()["agreement"])   # the second row's argmax differs
    0.5
    >>> agreement.reset(); agreement.update(student, student)
    >>> {k: round(float(v), 4) for k, v in agreement.compute().items()}
    {'agreement': 1.0, 'kl': 0.0}

    Args:
        temperature: softening temperature for the KL (1.0: the models' own distributions).

    ``update(student_logits, teacher_logits, mask=None)``: ``mask`` (shape of the logits without
    the class dim, non-zero = counted) drops padding or ignored positions. ``compute()`` returns
    ``{"agreement": fraction of positions with the same argmax, "kl": mean KL per position}``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, temperature: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` must be a number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.add_state("agree", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kl_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"`student_logits` {tuple(student_logits.shape)} and `teacher_logits` {tuple(teacher_logits.shape)} differ"
            )
        student = student_logits.detach().float().reshape(-1, student_logits.shape[-1])
        teacher = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
        if mask is None:
            keep = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
        else:
            if mask.shape != student_logits.shape[:-1]:
                raise ValueError(f"`mask` must have shape {tuple(student_logits.shape[:-1])}, got {tuple(mask.shape)}")
            keep = mask.reshape(-1) != 0
        log_p_student = F.log_softmax(student / self.temperature, dim=-1)
        log_p_teacher = F.log_softmax(teacher / self.temperature, dim=-1)
        kl_rows = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
        same = student.argmax(-1) == teacher.argmax(-1)
        self.agree += (same & keep).sum().to(self.agree.dtype)
        self.kl_sum += (kl_rows * keep).sum().to(self.kl_sum.dtype)
        self.count += keep.sum().to(self.count.dtype)

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.clamp(min=1)
        return {"agreement": self.agree / count, "kl": self.kl_sum / count}


class Sparsity(Metric):
    """Fraction of exact zeros over the weights of the selected modules of a model.

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2))
    >>> with torch.no_grad():
    ...     model[0].weight[0] = 0.0
    >>> sparsity = Sparsity(modules=["0"])
    >>> sparsity.update(model)
    >>> float(sparsity.compute())
    0.5

    Args:
        modules, exclude: as everywhere in the package (names, ``re:`` regexes, module types, on
            the unwrapped model); ``modules=None`` means every ``nn.Linear`` and ``nn.Conv1d/2d/3d``.

    ``update(model)`` counts zeros and elements of each selected ``.weight``; ``compute()`` is
    zeros / elements over every update since the last ``reset()``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, modules: ModuleSpec = None, exclude: ModuleSpec = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.modules_spec = normalize_spec(modules, argument="modules") or None
        self.exclude_spec = normalize_spec(exclude, argument="exclude") or None
        self.add_state("zeros", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        for _, module in select_modules(model, modules=self.modules_spec, exclude=self.exclude_spec, warn_shared=False):
            weight = module.weight.detach()
            self.zeros += (weight == 0).sum().to(device=self.zeros.device, dtype=self.zeros.dtype)
            self.total += weight.numel()

    def compute(self) -> torch.Tensor:
        return self.zeros / self.total.clamp(min=1)
