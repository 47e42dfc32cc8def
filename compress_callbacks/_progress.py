"""Progress bars for the long work the package does itself: calibration, teacher-logit caching, exports.

tqdm is optional. ``progress=None`` shows a bar only when stderr is a terminal (tqdm's ``disable=None``),
``True`` always (an ``ImportError`` without tqdm), ``False`` never.

>>> list(progress_bar([1, 2, 3], False, desc="work"))   # progress=False: the iterable itself
[1, 2, 3]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["StageBar", "check_progress", "progress_bar"]


def check_progress(progress: Any) -> bool | None:
    """``progress`` checked: None, True or False (else ``TypeError`` naming it)."""
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"`progress` must be None, True or False, got {progress!r}")
    return progress


def _tqdm(progress: bool | None) -> Any:
    """tqdm's class, or None where no bar is to be shown."""
    if progress is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        if progress:
            raise ImportError("`progress=True` needs tqdm: pip install tqdm") from None
        return None
    return tqdm


def progress_bar(items: Iterable[Any], progress: bool | None, *, desc: str, unit: str = "batch") -> Iterable[Any]:
    """``items`` wrapped in a tqdm bar (its length as total when it has one), or ``items`` itself."""
    tqdm = _tqdm(check_progress(progress))
    if tqdm is None:
        return items
    total = len(items) if hasattr(items, "__len__") else None
    return tqdm(items, total=total, desc=desc, unit=unit, disable=None if progress is None else False)


class StageBar:
    """A bar over named stages: call it with each stage's name as the stage starts, ``close()`` at the end
    (a context manager too; a bar left open by an exception closes when collected).

    >>> stage = StageBar("export", ["lower", "check"], progress=False)
    >>> stage("lower"); stage("check"); stage.close()
    >>> stage.started
    ['lower', 'check']
    """

    def __init__(self, desc: str, stages: Sequence[str], progress: bool | None) -> None:
        tqdm = _tqdm(check_progress(progress))
        self.started: list[str] = []
        self._bar = None if tqdm is None else tqdm(
            total=len(stages), desc=desc, unit="stage", disable=None if progress is None else False)

    def __call__(self, stage: str) -> None:
        if self._bar is not None:
            if self.started:
                self._bar.update(1)
            self._bar.set_postfix_str(stage)
        self.started.append(stage)

    def close(self) -> None:
        if self._bar is not None:
            if self.started:
                self._bar.update(1)
            self._bar.close()
            self._bar = None

    def __enter__(self) -> StageBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
