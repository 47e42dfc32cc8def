"""Range observation, once: the min / max of what flows through a tensor, and its moving average.

QAT's input observers, ``ptq.calibrate`` and export's output calibration all reduce a tensor to a
range with :func:`tensor_range` and keep ranges in a :class:`RangeObserver`; which values count
towards a range is decided in :func:`tensor_range` alone: the finite ones (``inf`` / NaN never do).

>>> import torch
>>> observer = RangeObserver(2)
>>> observer.observe(0, torch.tensor([-1.0, 3.0])); observer.observe(0, torch.tensor([5.0]))
>>> observer.observed_min.tolist(), observer.observed_max.tolist(), observer.seen.tolist()
([-1.0, inf], [5.0, -inf], [True, False])
>>> observer.fold_moving_average(0.5, fresh=[0])   # a first observation is taken as it is
>>> observer.running_min.tolist(), observer.running_max.tolist()
([-1.0, 0.0], [5.0, 0.0])
>>> observer.observe(0, torch.tensor([1.0])); observer.fold_moving_average(0.5)
>>> observer.running_min.tolist(), observer.running_max.tolist()
([0.0, 0.0], [3.0, 0.0])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .fake_quant import _compiling

__all__ = ["tensor_range", "moving_average_range", "RangeObserver"]


def tensor_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(min, max)`` of the finite values of ``x``, as 0-dim tensors on its device.

    ``inf`` and NaN never enter a range (one overflowed activation would make every later scale
    ``inf``, then every output NaN); a tensor without a finite value (empty, or all ``inf`` / NaN)
    gives ``(inf, -inf)``, which widens no range.

    >>> low, high = tensor_range(torch.tensor([[2.0, -1.0], [float("nan"), float("-inf")]]))
    >>> low.item(), high.item(), [t.item() for t in tensor_range(torch.zeros(0))]
    (-1.0, 2.0, [inf, -inf])
    """
    x = x.detach()
    if x.numel() == 0:
        empty = torch.tensor(float("inf"), device=x.device)
        return empty, -empty
    if x.device.type == "cpu" and not _compiling():  # reading two numbers back costs nothing here
        low, high = torch.aminmax(x)
        if math.isfinite(low) and math.isfinite(high):
            return low, high
    # elsewhere without a host sync: the extremes of the finite values only
    finite = torch.isfinite(x)
    return torch.where(finite, x, float("inf")).amin(), torch.where(finite, x, float("-inf")).amax()


def moving_average_range(
    running_min: torch.Tensor,
    running_max: torch.Tensor,
    observed_min: torch.Tensor,
    observed_max: torch.Tensor,
    averaging_constant: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exponential moving average of observed ranges (torch.ao's MovingAverageMinMaxObserver update).

    >>> moving_average_range(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([-1.0]), torch.tensor([3.0]), 0.5)
    (tensor([-0.5000]), tensor([2.]))
    """
    c = averaging_constant
    return running_min + c * (observed_min - running_min), running_max + c * (observed_max - running_max)


class RangeObserver:
    """Ranges of ``size`` tensors (slots), packed in float32 vectors on one device.

    >>> observer = RangeObserver(1)
    >>> for batch in (torch.tensor([0.5, 2.0]), torch.tensor([-3.0])):
    ...     observer.observe(0, batch)
    >>> observer.observed_min.tolist(), observer.observed_max.tolist()
    ([-3.0], [2.0])

    ``observed_min`` / ``observed_max``: min / max over everything observed since the last
    :meth:`reset` (``inf`` / ``-inf`` where nothing was). ``running_min`` / ``running_max``: their
    moving average, folded in by :meth:`fold_moving_average` (QAT's observers; calibration reads the
    observed ranges directly).
    """

    def __init__(self, size: int, device: torch.device | str | None = None) -> None:
        def full(value: float) -> torch.Tensor:
            return torch.full((size,), value, dtype=torch.float32, device=device)

        self.observed_min, self.observed_max = full(float("inf")), full(float("-inf"))
        self.running_min, self.running_max = full(0.0), full(0.0)

    @property
    def device(self) -> torch.device:
        return self.observed_min.device

    @property
    def seen(self) -> torch.Tensor:
        """Which slots observed a (finite) value since the last reset (bool vector)."""
        return self.observed_min <= self.observed_max

    def record(self, slot: int, low: torch.Tensor, high: torch.Tensor) -> None:
        """Widen slot ``slot``'s observed range to contain ``[low, high]`` (in place, no host sync)."""
        view_min, view_max = self.observed_min[slot : slot + 1], self.observed_max[slot : slot + 1]
        torch.minimum(view_min, low.to(view_min.device), out=view_min)
        torch.maximum(view_max, high.to(view_max.device), out=view_max)

    def observe(self, slot: int, x: torch.Tensor) -> None:
        """Widen slot ``slot``'s observed range by :func:`tensor_range` of ``x``."""
        self.record(slot, *tensor_range(x))

    def reset(self) -> None:
        self.observed_min.fill_(float("inf"))
        self.observed_max.fill_(float("-inf"))

    @torch.no_grad()
    def fold_moving_average(self, averaging_constant: float, fresh: Sequence[int] | torch.Tensor = ()) -> None:
        """Move each observed slot's running range towards what it observed; then :meth:`reset`.

        Slots in ``fresh`` (observed for the first time: indices, or a bool vector) take the observed
        range as it is; slots that observed nothing keep their running range.
        """
        low, high, seen = self.observed_min, self.observed_max, self.seen
        ema_min, ema_max = moving_average_range(self.running_min, self.running_max, low, high, averaging_constant)
        if torch.is_tensor(fresh):
            first = fresh.to(seen.device, torch.bool)
        else:
            first = torch.zeros_like(seen)
            first[list(fresh)] = True
        ema_min, ema_max = torch.where(first, low, ema_min), torch.where(first, high, ema_max)
        self.running_min.copy_(torch.where(seen, ema_min, self.running_min))
        self.running_max.copy_(torch.where(seen, ema_max, self.running_max))
        self.reset()
