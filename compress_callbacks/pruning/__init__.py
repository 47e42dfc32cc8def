"""Gradual magnitude pruning: pure mask math (``masks``) and the callback (``gmp``)."""

from .gmp import GradualMagnitudePruning

__all__ = ["GradualMagnitudePruning"]
