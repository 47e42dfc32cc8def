"""Gradual magnitude pruning: pure mask math (``masks``), the plan (``config``) and the callback (``gmp``)."""

from .config import PruningConfig
from .gmp import GradualMagnitudePruning

__all__ = ["GradualMagnitudePruning", "PruningConfig"]
