"""The base class every compression technique implements: lifecycle events plus state.

A technique is a thin stateful shell around pure tensor math, configured by a small dataclass
(its ``config_class``, see :mod:`compress_callbacks.config`). The manager drives it:

1. ``validate(model, optimizer)``: check everything, touch nothing (raise ValueError/TypeError);
   ``check_state(state, model)`` likewise for a state about to be loaded (a resume).
2. ``on_attach(model, optimizer, step)``: install (hooks, masks, fake-quant) for the current step;
   after both checks passed it must not fail, so that a failed ``attach`` leaves nothing behind.
3. ``on_before_update(step)``: right before a real optimizer update (gradients are final).
4. ``on_update(step)``: right after the ``step``-th real optimizer update.
5. ``finalize(model)``: bake the result into plain modules and remove every hook.

>>> class CountUpdates(CompressionTechnique):
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

import dataclasses
import inspect
from typing import Any

import torch
import torch.nn as nn

from .config import TechniqueConfig

__all__ = ["CompressionTechnique"]


def _config_field(name: str) -> property:
    return property(lambda self: getattr(self.settings, name), doc=f"``{name}`` of ``self.settings`` (read-only).")


class CompressionTechnique:
    """Base class for one compression technique driven by :class:`CompressionManager`.

    >>> import dataclasses
    >>> from compress_callbacks.config import TechniqueConfig, check_int
    >>> @dataclasses.dataclass
    ... class EveryConfig(TechniqueConfig):
    ...     every: int = 1
    ...     def validate(self):
    ...         self.every = check_int(self.every, "every", minimum=1)
    >>> class Every(CompressionTechnique, config_class=EveryConfig):
    ...     def __init__(self, every: int = 1):
    ...         super().__init__()
    ...         self.settings = EveryConfig(every=every)
    >>> Every(every=3).every, Every(every=3).config()
    (3, {'every': 3})

    Subclasses override the events they need. A technique declared with ``config_class=`` keeps its
    validated keyword arguments in ``self.settings`` (an instance of that dataclass) and exposes
    each field as a read-only attribute of the same name. ``config()`` returns the constructor
    keyword arguments (the recipe form); ``state_dict()`` holds only tensors and plain Python
    values, so checkpoints load with ``torch.load(weights_only=True)``.
    """

    #: The dataclass of this technique's keyword arguments (None: read them from same-named attributes).
    config_class: type[TechniqueConfig] | None = None

    #: Whether ``on_before_update`` must run (it costs a hook call per update when True).
    needs_before_update: bool = False
    #: Whether ``attach`` adds parameters of its own to the optimizer (they must be there before a
    #: resumed run loads the optimizer's state).
    adds_optimizer_parameters: bool = False
    supports_sharded_weights: bool = False  # handles FSDP2 (DTensor) weights; see targets.require_unsharded

    def __init_subclass__(cls, config_class: type[TechniqueConfig] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if config_class is not None:
            if not (isinstance(config_class, type) and issubclass(config_class, TechniqueConfig)):
                raise TypeError(f"`config_class` must be a TechniqueConfig dataclass, got {config_class!r}")
            cls.config_class = config_class
            for field in dataclasses.fields(config_class):
                if field.init and field.name not in cls.__dict__:
                    setattr(cls, field.name, _config_field(field.name))

    def __init__(self) -> None:
        self.manager = None  # set by CompressionManager.attach

    # -- recipe -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: TechniqueConfig) -> CompressionTechnique:
        """The technique ``config`` (an instance of ``config_class``) describes."""
        if cls.config_class is None or not isinstance(config, cls.config_class):
            expected = cls.config_class.__name__ if cls.config_class else "no config dataclass"
            raise TypeError(f"`config` must be a {expected} for {cls.__name__}, got {type(config).__name__}")
        return cls(**config.to_kwargs())

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this technique (used by recipes).

        With a ``config_class``: the fields of ``self.settings``; otherwise every constructor
        argument is read back from the attribute of the same name.
        """
        if self.config_class is not None:
            return self.settings.to_kwargs()
        parameters = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in parameters if name != "self"}

    # -- lifecycle ----------------------------------------------------------------------
    def target_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` pairs whose weights this technique changes on ``model`` (unwrapped): two
        techniques of one kind in a manager may not share one (checked at ``attach``). None by default."""
        return []

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

    def check_state(self, state: dict[str, Any], model: nn.Module | None) -> None:
        """Raise ValueError/TypeError if ``state`` (a ``state_dict()``) cannot be loaded; touch nothing.

        ``model`` is the unwrapped model it will apply to (attaching, or attached); None when the
        state is only stored for a later ``attach``: then check what can be checked without it. The
        manager checks every callback's part before it loads any, so a rejected resume changes nothing.
        """
        if not isinstance(state, dict):
            raise ValueError(f"`state` of {self.name} must be a dict (its state_dict()), got {type(state).__name__}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state (``check_state`` passed); called before ``on_attach`` or while attached (resume)."""

    # -- reporting ----------------------------------------------------------------------
    #: per-layer log keys (``layer/<module>/...``) are logged when a technique touches at most this
    #: many layers; with more, only the summary over layers (min / p10 / p50 / p90 / max / mean) is.
    max_layer_keys: int = 32

    def log_values(self) -> dict[str, float]:
        """Scalars worth logging now (names without prefix). The manager calls it at log steps and
        events only (it may measure every targeted weight); under FSDP2 on every rank together."""
        return {}

    def log_phase(self) -> Any:
        """A cheap value that changes when the technique enters a phase worth logging (QAT starting,
        observers or BatchNorm freezing): the manager logs ``log_values()`` after an update that changed it."""
        return None

    def summary_rows(self) -> list[dict[str, Any]]:
        """One dict per touched module for ``CompressionManager.summary()`` / ``report()``; no collective
        (rank 0 alone may call it)."""
        return []

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({args})"
