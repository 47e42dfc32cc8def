"""The base class every compression technique implements: lifecycle events plus state.

A callback is a thin stateful shell around pure tensor math. The manager drives it:

1. ``validate(model, optimizer)``: check everything, touch nothing (raise ValueError/TypeError).
2. ``on_attach(model, optimizer, step)``: install (hooks, masks, fake-quant) for the current step.
3. ``on_before_update(step)``: right before a real optimizer update (gradients are final).
4. ``on_update(step)``: right after the ``step``-th real optimizer update.
5. ``finalize(model)``: bake the result into plain modules and remove every hook.

>>> class CountUpdates(CompressionCallback):
...     def __init__(self):
...         super().__init__()
...         self.updates = 0
...     def on_update(self, step):
...         self.updates += 1
...     def state_dict(self):
...         return {"updates": self.updates}
...     def load_state_dict(self, state):
...         self.updates = state["updates"]
>>> CountUpdates().state_dict()
{'updates': 0}
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

__all__ = ["CompressionCallback"]


class CompressionCallback:
    """Base class for one compression technique driven by :class:`CompressionManager`.

    Subclasses override the events they need. ``config()`` returns the constructor keyword
    arguments (the recipe form); ``state_dict()`` holds only tensors and plain Python values, so
    checkpoints load with ``torch.load(weights_only=True)``.
    """

    #: Whether ``on_before_update`` must run (it costs a hook call per update when True).
    needs_before_update: bool = False
    supports_sharded_weights: bool = False  # handles FSDP2 (DTensor) weights; see targets.require_unsharded

    def __init__(self) -> None:
        self.manager = None  # set by CompressionManager.attach

    # -- recipe -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this callback (used by recipes).

        Every constructor argument is read back from the attribute of the same name.
        """
        parameters = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in parameters if name != "self"}

    # -- lifecycle ----------------------------------------------------------------------
    def validate(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Raise ValueError/TypeError for anything wrong; must not modify the model."""

    def on_attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        """Install on ``model`` (already unwrapped); ``step`` real updates have happened so far."""

    def on_before_update(self, step: int) -> None:
        """Called right before the (``step`` + 1)-th real update, once gradients are final."""

    def on_update(self, step: int) -> None:
        """Called right after the ``step``-th real update (``step`` counts from 1)."""

    def finalize(self, model: nn.Module) -> None:
        """Bake the compression into ``model`` in place and remove every hook."""

    # -- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state; called before ``on_attach`` or while attached (resume)."""

    # -- reporting ----------------------------------------------------------------------
    def log_values(self) -> dict[str, float]:
        """Scalars worth logging now (names without prefix); cheap to call."""
        return {}

    def summary_rows(self) -> list[dict[str, Any]]:
        """One dict per touched module for ``CompressionManager.summary()``."""
        return []

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({args})"
