"""The pruning plan as a dataclass: ``GradualMagnitudePruning``'s keyword arguments, validated here only.

>>> config = PruningConfig(target_sparsity=None, start_step=0, end_step=100, granularity="2:4")
>>> config.target_sparsity, config.nm
(0.5, (2, 4))
>>> PruningConfig(target_sparsity=0.5, start_step=10, end_step=10)
Traceback (most recent call last):
...
compress_callbacks.config.ArgumentValueError: `end_step` (10) must be > `start_step` (10)
"""

from __future__ import annotations

import dataclasses
import math

from ..config import ArgumentTypeError, ArgumentValueError, TechniqueConfig, check_choice, check_fraction, check_int
from ..targets import ModuleSpec, normalize_spec
from .masks import parse_nm

__all__ = ["GRANULARITIES", "MASK_GRADIENTS", "SCOPES", "PruningConfig"]

GRANULARITIES = ("unstructured", "channel", "head")  # and "N:M" strings
SCOPES = ("layer", "global")
MASK_GRADIENTS = ("backward", "step")


@dataclasses.dataclass
class PruningConfig(TechniqueConfig):
    """What to prune, how far and when (see ``GradualMagnitudePruning`` for each field's meaning).

    >>> from compress_callbacks import GradualMagnitudePruning
    >>> config = PruningConfig(target_sparsity=0.9, start_step=100, end_step=1000, modules=iter(["re:.*fc.*"]))
    >>> GradualMagnitudePruning.from_config(config).modules
    ['re:.*fc.*']

    Validation normalizes: ``target_sparsity`` becomes ``1 - N/M`` for ``"N:M"`` when None, and
    ``modules`` / ``exclude`` become lists (a generator is read once, here).
    """

    target_sparsity: float | None
    start_step: int
    end_step: int
    update_every: int = 100
    initial_sparsity: float = 0.0
    granularity: str = "unstructured"
    scope: str = "layer"
    modules: ModuleSpec = None
    exclude: ModuleSpec = None
    mask_gradients: str = "backward"

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an ``"N:M"`` granularity, else None."""
        return parse_nm(self.granularity)

    def validate(self) -> None:
        self.mask_gradients = check_choice(self.mask_gradients, "mask_gradients", MASK_GRADIENTS)
        self.granularity = _check_granularity(self.granularity)
        nm = self.nm
        if nm is not None:
            implied = 1.0 - nm[0] / nm[1]
            if self.target_sparsity is None:
                self.target_sparsity = implied
            elif not math.isclose(check_fraction(self.target_sparsity, "target_sparsity"), implied, abs_tol=1e-9):
                raise ArgumentValueError(
                    "target_sparsity",
                    f"`target_sparsity` must be 1 - N/M = {implied:g} for granularity {self.granularity!r} (or None), "
                    f"got {self.target_sparsity!r}",
                )
        if self.target_sparsity is None:
            raise ArgumentTypeError(
                "target_sparsity", "`target_sparsity` must be a float in [0, 1), got None (None only with an 'N:M' granularity)"
            )
        self.target_sparsity = check_fraction(self.target_sparsity, "target_sparsity")
        self.initial_sparsity = check_fraction(self.initial_sparsity, "initial_sparsity")
        if self.initial_sparsity > self.target_sparsity:
            raise ArgumentValueError(
                "initial_sparsity",
                f"`initial_sparsity` ({self.initial_sparsity}) must be <= `target_sparsity` ({self.target_sparsity})",
            )
        self.start_step = check_int(self.start_step, "start_step", minimum=0)
        self.end_step = check_int(self.end_step, "end_step", minimum=0)
        if self.end_step <= self.start_step:
            raise ArgumentValueError("end_step", f"`end_step` ({self.end_step}) must be > `start_step` ({self.start_step})")
        self.update_every = check_int(self.update_every, "update_every", minimum=1)
        self.scope = check_choice(self.scope, "scope", SCOPES)
        self.modules = None if self.modules is None else normalize_spec(self.modules, argument="modules")
        self.exclude = None if self.exclude is None else normalize_spec(self.exclude, argument="exclude")


def _check_granularity(granularity: object) -> str:
    accepted = "'unstructured', 'channel', 'head' or 'N:M' (e.g. '2:4')"
    if isinstance(granularity, str) and ":" in granularity:
        try:
            parse_nm(granularity)
        except ValueError as err:
            raise ArgumentValueError("granularity", str(err)) from None
        return granularity
    return check_choice(granularity, "granularity", GRANULARITIES, accepted)
