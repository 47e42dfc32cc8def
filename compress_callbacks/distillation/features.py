"""Feature distillation: pull named student activations towards named teacher activations.

Forward hooks capture the outputs of the paired modules while the student and the teacher run;
calling the ``FeatureDistillation`` module then returns the mean over pairs of the MSE (or
``1 - cosine``) between the student's (optionally projected) features and the teacher's.

Where the projections' parameters go: they are the *only* parameters of this module (the student
and the teacher are referenced, not registered), so add ``features.parameters()`` to the optimizer
and, under DDP, pass ``features`` to ``accelerator.prepare`` and call the prepared object for the
loss: DDP then broadcasts the projections' initial weights and averages their gradients like the
model's, so every rank keeps identical projections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..targets import unwrap_model
from .losses import cosine_feature_loss, mse_feature_loss

__all__ = ["FeatureDistillation", "module_width"]

_LOSSES = {"mse": mse_feature_loss, "cosine": cosine_feature_loss}
_WIDTH_ATTRIBUTES = ("out_features", "out_channels", "embedding_dim", "num_features", "hidden_size")


def module_width(module: nn.Module) -> int | None:
    """The feature width a module outputs, read from its attributes (None when unknown).

    >>> import torch.nn as nn
    >>> module_width(nn.Conv2d(3, 32, 3)), module_width(nn.LayerNorm(48)), module_width(nn.ReLU())
    (32, 48, None)
    """
    for attribute in _WIDTH_ATTRIBUTES:
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and shape:
        return int(shape[-1])
    return None


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


class FeatureDistillation(nn.Module):
    """Match outputs of named student modules to named teacher modules (forward hooks).

    >>> import torch, torch.nn as nn
    >>> student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> teacher = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    >>> features = FeatureDistillation(student, teacher, layers={"0": "0"})   # 16 -> 64: learned projection
    >>> optimizer = torch.optim.SGD([*student.parameters(), *features.parameters()], lr=0.1)
    >>> x = torch.randn(5, 8)
    >>> logits = student(x)
    >>> with torch.no_grad():
    ...     _ = teacher(x)
    >>> loss = features()   # after both models ran on the batch
    >>> loss.backward()
    >>> features.projections["0"].weight.shape
    torch.Size([64, 16])

    Args:
        student: the student model (may be wrapped by DDP/``accelerator.prepare``; names are on the
            unwrapped model).
        teacher: the teacher model (names on the unwrapped model).
        layers: ``{student_module_name: teacher_module_name}`` or a list of names shared by both.
        loss: ``"mse"`` or ``"cosine"`` (``1 - cosine similarity`` along the feature dim).
        projection: ``"auto"`` (a learned bias-free linear map where widths differ), ``True``
            (always) or ``False`` (never: widths must match).
        feature_dim: the dim holding the features (``-1`` for Linear/Transformer outputs, ``1`` for
            Conv outputs ``[B, C, H, W]``).
        widths: ``{student_module_name: (student_width, teacher_width)}`` for modules whose width
            cannot be read from their attributes.

    Call the module (no arguments) after the student and the teacher have run on the batch to get
    the feature loss; the captured activations are released by that call. ``remove()`` takes the
    hooks off. See the module docstring for optimizers and DDP.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        layers: Mapping[str, str] | Sequence[str],
        loss: str = "mse",
        projection: bool | str = "auto",
        feature_dim: int = -1,
        widths: Mapping[str, tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise TypeError("`student` and `teacher` must be nn.Module instances")
        if loss not in _LOSSES:
            raise ValueError(f"`loss` must be one of {sorted(_LOSSES)}, got {loss!r}")
        if projection not in ("auto", True, False):
            raise ValueError(f"`projection` must be 'auto', True or False, got {projection!r}")
        if isinstance(layers, Mapping):
            pairs = [(str(s), str(t)) for s, t in layers.items()]
        elif isinstance(layers, Sequence) and not isinstance(layers, str):
            pairs = [(str(name), str(name)) for name in layers]
        else:
            raise TypeError("`layers` must be a {student_name: teacher_name} dict or a list of names")
        if not pairs:
            raise ValueError("`layers` must name at least one module pair")
        widths = dict(widths or {})
        student_modules = dict(unwrap_model(student).named_modules())
        teacher_modules = dict(unwrap_model(teacher).named_modules())
        for s_name, t_name in pairs:
            if s_name not in student_modules:
                raise ValueError(f"`layers`: the student has no module named {s_name!r}")
            if t_name not in teacher_modules:
                raise ValueError(f"`layers`: the teacher has no module named {t_name!r}")

        self.loss_name = loss
        self.feature_dim = int(feature_dim)
        self.pairs = pairs
        self.projections = nn.ModuleDict()
        for s_name, t_name in pairs:
            s_width, t_width = widths.get(s_name) or (
                module_width(student_modules[s_name]),
                module_width(teacher_modules[t_name]),
            )
            if projection is False:
                continue
            if s_width is None or t_width is None:
                raise ValueError(
                    f"`widths`: cannot read the feature widths of {s_name!r}/{t_name!r}; "
                    f"pass widths={{{s_name!r}: (student_width, teacher_width)}}"
                )
            if projection is True or s_width != t_width:
                self.projections[self._key(s_name)] = nn.Linear(s_width, t_width, bias=False)

        self._student_features: dict[str, torch.Tensor] = {}
        self._teacher_features: dict[str, torch.Tensor] = {}
        self._handles = []
        for s_name, t_name in pairs:
            self._handles.append(student_modules[s_name].register_forward_hook(self._capture(self._student_features, s_name)))
            self._handles.append(teacher_modules[t_name].register_forward_hook(self._capture(self._teacher_features, t_name)))
        self._last: dict[str, torch.Tensor] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # ModuleDict keys may not contain dots

    @staticmethod
    def _capture(store: dict[str, torch.Tensor], name: str):
        def hook(module, args, output):
            tensor = _first_tensor(output)
            if tensor is not None:
                store[name] = tensor

        return hook

    def project(self, student_name: str, features: torch.Tensor) -> torch.Tensor:
        """Apply the learned projection of ``student_name`` (identity when there is none)."""
        key = self._key(student_name)
        if key not in self.projections:
            return features
        projection = self.projections[key]
        moved = features.movedim(self.feature_dim, -1)
        return projection(moved.to(projection.weight.dtype)).movedim(-1, self.feature_dim)

    def forward(self) -> torch.Tensor:
        """The feature loss for the batch both models just ran on (mean over the pairs)."""
        missing = [s for s, t in self.pairs if s not in self._student_features] + [
            t for s, t in self.pairs if t not in self._teacher_features
        ]
        if missing:
            raise ValueError(
                f"no captured features for {missing}: run the student and the teacher on the batch "
                "(e.g. DistillationLoss with `inputs=`) before calling FeatureDistillation"
            )
        loss_fn = _LOSSES[self.loss_name]
        losses = {}
        for s_name, t_name in self.pairs:
            student = self.project(s_name, self._student_features.pop(s_name))
            teacher = self._teacher_features.pop(t_name)
            if self.loss_name == "cosine":
                losses[s_name] = loss_fn(student, teacher, dim=self.feature_dim)
            else:
                losses[s_name] = loss_fn(student, teacher)
        total = torch.stack(list(losses.values())).mean()
        self._last = {**{f"feature/{k}": v.detach() for k, v in losses.items()}, "feature/total": total.detach()}
        return total

    def log_values(self) -> dict[str, float]:
        """The last call's per-pair losses and their mean, as floats."""
        return {key: float(value) for key, value in self._last.items()}

    def remove(self) -> None:
        """Take the forward hooks off the student and the teacher."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._student_features.clear()
        self._teacher_features.clear()
