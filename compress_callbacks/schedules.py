"""Pure schedule functions: how much compression applies after ``step`` real optimizer updates.

Every function here is a plain function of integers and floats, with no state, so the
callbacks stay thin and the math is tested directly.

>>> cubic_sparsity(0, initial=0.0, final=0.9, start=100, end=1000, every=50)
0.0
>>> cubic_sparsity(1000, initial=0.0, final=0.9, start=100, end=1000, every=50)
0.9
"""

from __future__ import annotations

__all__ = ["cubic_sparsity", "last_grid_point", "schedule_grid"]


def last_grid_point(step: int, *, start: int, end: int, every: int) -> int | None:
    """The last update point ``start + k*every <= step`` (clamped to ``end``), or None before ``start``.

    >>> last_grid_point(149, start=100, end=1000, every=50)
    100
    >>> last_grid_point(5000, start=100, end=1000, every=50)
    1000
    """
    if step < start:
        return None
    if step >= end:
        return end
    return start + ((step - start) // every) * every


def cubic_sparsity(step: int, *, initial: float, final: float, start: int, end: int, every: int) -> float:
    """Zhu & Gupta (2017) sparsity after ``step`` real updates.

    ``s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3`` evaluated at the last grid point
    ``t0 + k*every <= step``; zero before ``t0``; exactly ``final`` from ``t1`` on.

    >>> round(cubic_sparsity(550, initial=0.0, final=0.8, start=100, end=1000, every=50), 4)
    0.7
    """
    t = last_grid_point(step, start=start, end=end, every=every)
    if t is None:
        return 0.0
    if t >= end:
        return float(final)
    progress = (t - start) / (end - start)
    return float(final + (initial - final) * (1.0 - progress) ** 3)


def schedule_grid(*, start: int, end: int, every: int) -> list[int]:
    """All steps at which a schedule recomputes its target (the grid points and ``end``).

    >>> schedule_grid(start=0, end=10, every=4)
    [0, 4, 8, 10]
    """
    points = list(range(start, end, every))
    points.append(end)
    return points
