"""The event loop: counts real optimizer updates and drives every compression callback."""

from __future__ import annotations

import inspect
import itertools
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate.logging import get_logger
from accelerate.state import is_initialized as accelerate_state_initialized

from .callback import CompressionTechnique
from .config import check_int
from .targets import require_disjoint_targets, require_unsharded, unwrap_model

__all__ = ["CompressionManager", "being_compressed", "technique_plan", "underlying_optimizer"]

# Accelerate's multi-process logger: logs on the main process only, once an Accelerator exists
logger = get_logger("compress_callbacks")

# the unwrapped models that an attached manager is training (until it finalizes them); copies are not
_ATTACHED_MODELS: weakref.WeakSet = weakref.WeakSet()


def being_compressed(model: nn.Module) -> bool:
    """Whether an attached :class:`CompressionManager` is training ``model`` (or a model containing it)
    and has not finalized it yet: its masks and fake-quant are still live.

    >>> import torch.nn as nn
    >>> being_compressed(nn.Linear(2, 2))
    False
    """
    root = unwrap_model(model)
    return any(any(module is root for module in attached.modules()) for attached in list(_ATTACHED_MODELS))


def underlying_optimizer(optimizer: Any) -> Any:
    """The real ``torch.optim.Optimizer`` behind Accelerate / Lightning / Trainer wrappers.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    >>> underlying_optimizer(opt) is opt
    True
    """
    seen = set()
    while id(optimizer) not in seen:  # AcceleratedOptimizer subclasses Optimizer but wraps the real one
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or not hasattr(inner, "param_groups"):
            break
        optimizer = inner
    return optimizer


def update_was_skipped(optimizer: torch.optim.Optimizer) -> bool:
    """True inside a step hook when the grad scaler told a fused optimizer to skip this step.

    ``GradScaler`` still calls ``step()`` of optimizers that support AMP scaling natively (fused
    AdamW, the Transformers default); they skip inside the kernel, and ``optimizer.found_inf``
    (set only for the duration of the call) is the only place that says so.
    """
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is None:
        return False
    return bool(found_inf.item() if torch.is_tensor(found_inf) else found_inf)


class CompressionManager:
    """Wires compression callbacks into an existing training loop.

    >>> import torch, torch.nn as nn
    >>> from compress_callbacks import GradualMagnitudePruning
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> manager = CompressionManager(GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=4, update_every=2))
    >>> manager.attach(model, optimizer)   # the loop itself stays as it is
    >>> for _ in range(4):
    ...     model(torch.randn(4, 8)).sum().backward()
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    >>> manager.step
    4
    >>> compressed = manager.finalize(model)
    >>> float((compressed[0].weight == 0).float().mean())
    0.5

    Args:
        *callbacks: ``GradualMagnitudePruning``, ``QuantizationAwareTraining``, ... (any
            :class:`CompressionTechnique`). They run in the order given.
        accelerator: optional ``accelerate.Accelerator``: the manager registers itself for
            ``save_state``/``load_state``, logs through ``accelerator.log`` and keeps ranks in sync.
        log_every: log callback and loss values every this many real updates (0: only on events).
            Events are logged too: ``attach``, every mask update, QAT starting / freezing, ``finalize``.
            The keys are listed in ``docs/manager.md``; they are computed only when logged.
        allow_new_plan: resume from a state saved with another plan (see below) without raising.

    ``attach(model, optimizer)`` hooks the real optimizer: every real update (not an accumulation
    micro-step, not an update the AMP grad scaler skipped) advances ``manager.step`` by one and
    runs the callbacks. Loops that cannot be hooked attach with ``hook=False`` and call
    ``manager.record_update()`` once after each real update.

    ``state_dict()`` holds the step, every callback's state and its plan (its keyword arguments,
    module types written ``"type:torch.nn.Linear"``). ``load_state_dict`` raises ``ValueError``
    naming each argument whose value differs from this manager's (a resume with another target
    sparsity, schedule, granularity or bit width would silently mix two plans) unless
    ``allow_new_plan`` is given (to the call, or to the manager for ``accelerator.load_state``):
    then training continues from the saved masks and ranges under this manager's plan. A state
    saved before plans were stored loads as it is.

    ``attach`` and ``load_state_dict`` check everything (the model, the optimizer, the accelerator,
    every callback's part of the state) before they change anything: when they raise, the model, the
    optimizer and the manager are as they were.
    """

    def __init__(
        self, *callbacks: CompressionTechnique, accelerator: Any = None, log_every: int = 50, allow_new_plan: bool = False
    ) -> None:
        if len(callbacks) == 1 and isinstance(callbacks[0], (list, tuple)):
            callbacks = tuple(callbacks[0])
        for cb in callbacks:
            if not isinstance(cb, CompressionTechnique):
                raise TypeError(
                    f"`callbacks` must be CompressionTechnique instances (e.g. GradualMagnitudePruning); got {cb!r}"
                )
        if len({id(cb) for cb in callbacks}) != len(callbacks):
            raise ValueError("`callbacks`: the same callback instance was given twice")
        log_every = check_int(log_every, "log_every", minimum=0)
        _check_accelerator(accelerator)
        if not isinstance(allow_new_plan, bool):
            raise TypeError(f"`allow_new_plan` must be True or False, got {allow_new_plan!r}")
        self.callbacks: list[CompressionTechnique] = list(callbacks)
        self.allow_new_plan = allow_new_plan
        self.accelerator = accelerator
        self.log_every = log_every
        self._step = 0
        self._model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._handles: list[Any] = []
        self._pending_state: dict[str, Any] | None = None
        self._loss_sources: list[Any] = []
        self._registered_for_checkpointing = False
        self._finalized = False
        self.hooked = False
        self._phases: list[Any] = []  # each callback's log_phase() after the last update
        self._pending: dict[str, float] | None = None  # values logged by callbacks during the running update
        self._last_logged: tuple[int, int, dict[str, float]] | None = None  # (record number, step, values)
        self.last_event_step: int | None = None  # step of the last event (the Trainer adapter logs that step)

    # ------------------------------------------------------------------ properties
    @property
    def step(self) -> int:
        """Real optimizer updates so far (what every ``*_step`` argument counts)."""
        return self._step

    @property
    def attached(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> nn.Module | None:
        """The unwrapped model the callbacks act on (None before ``attach``)."""
        return self._model

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The underlying ``torch.optim.Optimizer`` (None before ``attach``)."""
        return self._optimizer

    @property
    def has_before_update_hook(self) -> bool:
        """Whether callbacks get ``on_before_update`` (a pre-step hook on a real torch optimizer)."""
        return isinstance(self._optimizer, torch.optim.Optimizer)

    @property
    def is_main_process(self) -> bool:
        if self.accelerator is not None:
            return bool(self.accelerator.is_main_process)
        from ._dist import rank

        return rank() == 0

    # ------------------------------------------------------------------ attach
    def attach(self, model: nn.Module, optimizer: Any, *, hook: bool = True) -> None:
        """Install every callback on ``model`` and hook the real updates of ``optimizer``.

        ``model`` may be wrapped (DDP, ``torch.compile``, ``accelerator.prepare``); callbacks act
        on the unwrapped module, with the same ``Parameter`` objects, so the optimizer and DDP keep
        working. Everything is validated before anything is modified (a state loaded before
        ``attach`` included): when ``attach`` raises, nothing is installed.
        """
        if self._finalized:
            raise ValueError("this CompressionManager was finalized; create a new one to `attach` again")
        if self.attached:
            raise ValueError("`attach` was already called on this CompressionManager; call it once per run")
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        require_unsharded(model, self.callbacks)
        root = unwrap_model(model)
        real_optimizer = underlying_optimizer(optimizer) if optimizer is not None else None
        if real_optimizer is not None and not hasattr(real_optimizer, "param_groups"):
            raise TypeError(f"`optimizer` must be a torch optimizer (or a wrapper of one), got {type(optimizer).__name__}")
        if hook and not isinstance(real_optimizer, torch.optim.Optimizer):
            raise TypeError(
                "`optimizer` exposes no step hooks; attach with hook=False and call manager.record_update() "
                "after each real optimizer update"
            )
        _check_accelerator(self.accelerator)
        _require_materialized(root)
        for cb in self.callbacks:
            cb.validate(root, real_optimizer)
        require_disjoint_targets(root, self.callbacks)
        if self._pending_state is not None:
            self._check_callback_states(self._pending_state, root)

        # everything is checked: from here on nothing may fail on the user's input
        self._model, self._optimizer = root, real_optimizer
        for cb in self.callbacks:
            cb.manager = self
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        for cb in self.callbacks:
            cb.on_attach(root, real_optimizer, self._step)
        if isinstance(real_optimizer, torch.optim.Optimizer):
            if any(cb.needs_before_update for cb in self.callbacks):
                self._handles.append(real_optimizer.register_step_pre_hook(self._pre_step_hook))
            if hook:
                self._handles.append(real_optimizer.register_step_post_hook(self._post_step_hook))
                self.hooked = True
        if self.accelerator is not None and not self._registered_for_checkpointing:
            self.accelerator.register_for_checkpointing(self)
            self._registered_for_checkpointing = True
        _ATTACHED_MODELS.add(root)
        self._phases = [cb.log_phase() for cb in self.callbacks]
        self._log_event("attach", self._technique_values(self.callbacks))

    # ------------------------------------------------------------------ stepping
    def _pre_step_hook(self, optimizer, args, kwargs):
        # step(closure) (Lightning, LBFGS): gradients exist only once the closure has run inside step
        # (``args`` may hold the optimizer itself first, which is not callable).
        index = next((i for i, arg in enumerate(args) if callable(arg)), None)
        closure = kwargs.get("closure") if index is None else args[index]
        if not callable(closure):
            self._before_update(optimizer)
            return None

        def closure_then_before_update():
            result = closure()
            self._before_update(optimizer)
            return result

        if index is None:
            return args, {**kwargs, "closure": closure_then_before_update}
        return (*args[:index], closure_then_before_update, *args[index + 1:]), kwargs

    def _before_update(self, optimizer) -> None:
        if update_was_skipped(optimizer):
            return
        for cb in self.callbacks:
            if cb.needs_before_update:
                cb.on_before_update(self._step)

    def _post_step_hook(self, optimizer, args, kwargs) -> None:
        if update_was_skipped(optimizer):
            return
        self._advance()

    def record_update(self) -> None:
        """Count one real optimizer update by hand (only for ``attach(..., hook=False)``)."""
        if not self.attached:
            raise ValueError("call `attach` before `record_update`")
        if self.hooked:
            raise ValueError("this manager counts updates through optimizer hooks; `record_update` would count twice")
        self._advance()

    def _advance(self) -> None:
        self._step += 1
        self._pending = {}  # what callbacks log at their events during the update goes out in one record
        try:
            for cb in self.callbacks:
                cb.on_update(self._step)
        finally:
            pending, self._pending = self._pending, None
        phases = [cb.log_phase() for cb in self.callbacks]
        changed = [cb for cb, before, now in zip(self.callbacks, self._phases, phases) if before != now]
        self._phases = phases
        if changed:
            self._mark_event("phase change of " + ", ".join(cb.name for cb in changed))
        if self.log_every and self._step % self.log_every == 0:
            pending.update(self.collect_log_values())
        elif changed:
            pending.update(self._technique_values(changed))
        if pending:
            self._send(pending)

    # ------------------------------------------------------------------ logging
    def register_loss(self, loss: Any) -> Any:
        """Log ``loss.log_values()`` (e.g. a ``DistillationLoss``'s hard/soft/total) with the callbacks'."""
        if not hasattr(loss, "log_values"):
            raise TypeError("`loss` must have a `log_values()` method (e.g. DistillationLoss)")
        if loss not in self._loss_sources:
            self._loss_sources.append(loss)
        return loss

    def collect_log_values(self) -> dict[str, float]:
        """Every callback's and registered loss's values now, keyed ``compress/<technique>/<key>``.

        It measures (per-layer sparsity, quantization error): the manager calls it at log steps only.
        Under FSDP2 every rank must call it together (the quantization error gathers whole weights);
        the adapters and the manager do. The losses' values are this process's last micro-batch.
        """
        values = self._technique_values(self.callbacks)
        for source in self._loss_sources:
            for key, value in source.log_values().items():
                values[f"compress/{type(source).__name__}/{key}"] = float(value)
        return values

    @staticmethod
    def _technique_values(callbacks: list[CompressionTechnique]) -> dict[str, float]:
        return {f"compress/{cb.name}/{key}": float(value) for cb in callbacks for key, value in cb.log_values().items()}

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        """Log ``values`` for an event (callbacks call it when they change something, e.g. at a mask update):
        to ``accelerator.log`` when trackers are set, else to ``logging`` (main process). Values logged
        during an update go out with that update's other values, in one record."""
        if not values:
            return
        step = self._step if step is None else step
        self.last_event_step = step
        if self._pending is not None and step == self._step:
            self._pending.update(values)
        else:
            self._send(values, step)

    @property
    def last_logged(self) -> tuple[int, int, dict[str, float]] | None:
        """``(record number, step, values)`` of the last record the manager logged: the adapters forward
        each new record to their loggers (values logged again at the same step join that step's record,
        under a new number)."""
        if self._last_logged is None:
            return None
        number, step, values = self._last_logged
        return number, step, dict(values)

    def _send(self, values: dict[str, float], step: int | None = None) -> None:
        step = self._step if step is None else step
        if self._last_logged is None:
            self._last_logged = (1, step, dict(values))
        else:
            number, last_step, last_values = self._last_logged
            self._last_logged = (number + 1, step, {**last_values, **values} if last_step == step else dict(values))
        trackers = getattr(self.accelerator, "trackers", None) if self.accelerator is not None else None
        if trackers:
            self.accelerator.log(values, step=step)
        else:
            self._info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in values.items()))

    def _mark_event(self, event: str) -> None:
        self.last_event_step = self._step
        self._info("%s at step %d", event, self._step)

    def _log_event(self, event: str, values: dict[str, float]) -> None:
        self._mark_event(event)
        self._send(values)

    def _info(self, message: str, *args: Any) -> None:
        """Log on the main process: through Accelerate's logger once an Accelerator exists (it knows
        the ranks), else (a Lightning or hand-written loop) when ``is_main_process``."""
        if accelerate_state_initialized():
            logger.info(message, *args)
        elif self.is_main_process:
            logger.logger.info(message, *args)

    # ------------------------------------------------------------------ state
    def _keys(self) -> list[str]:
        return [f"{i}:{cb.name}" for i, cb in enumerate(self.callbacks)]

    def state_dict(self) -> dict[str, Any]:
        """Step count, every callback's state (masks, observer ranges, ...) and plan (its arguments).

        Plain tensors, numbers and strings: loadable with ``torch.load(weights_only=True)``.
        """
        return {
            "step": self._step,
            "callbacks": {key: cb.state_dict() for key, cb in zip(self._keys(), self.callbacks)},
            "plans": {key: technique_plan(cb) for key, cb in zip(self._keys(), self.callbacks)},
        }

    def load_state_dict(self, state: dict[str, Any], *, allow_new_plan: bool | None = None) -> None:
        """Restore a ``state_dict()``: before ``attach`` (applied on attach) or while attached (resume).

        ``manager.step`` takes the saved value at once. Raises ``ValueError``, changing nothing, for a
        state that does not fit (other callbacks, masks of other shapes, ...) or that was saved with
        another plan (naming each differing argument) unless ``allow_new_plan`` (default: the
        manager's ``allow_new_plan``) is True.
        """
        if allow_new_plan is None:
            allow_new_plan = self.allow_new_plan
        if not isinstance(allow_new_plan, bool):
            raise TypeError(f"`allow_new_plan` must be True, False or None, got {allow_new_plan!r}")
        self._check_layout(state)
        if not allow_new_plan:
            self._check_plan(state)
        self._check_callback_states(state, self._model)
        if self.attached:
            self._apply_state(state)
        else:
            self._pending_state = state
            self._step = state["step"]

    def _check_layout(self, state: Any) -> None:
        if not isinstance(state, dict) or "step" not in state or not isinstance(state.get("callbacks"), dict):
            raise ValueError("`state` is not a CompressionManager.state_dict()")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"`state`: step must be an int >= 0, got {step!r}")
        expected = self._keys()
        if list(state["callbacks"]) != expected:
            raise ValueError(
                f"`state` was saved with callbacks {list(state['callbacks'])}, this manager has {expected}"
            )
        if not isinstance(state.get("plans", {}), dict):
            raise ValueError(f"`state`: plans must be a dict, got {type(state['plans']).__name__}")

    def _check_plan(self, state: dict[str, Any]) -> None:
        """Raise naming every argument whose saved value differs from this manager's (states without plans pass)."""
        differences = []
        for key, cb in zip(self._keys(), self.callbacks):
            saved = state.get("plans", {}).get(key)
            if saved is None:
                continue
            # an argument the saved plan lacks (added to the technique since) ran with its default then
            saved = {**technique_plan(cb, defaults=True), **saved}
            for field, now in technique_plan(cb).items():
                if field in saved and saved[field] != now:
                    differences.append(f"{cb.name}.{field}: {saved[field]!r} in `state`, {now!r} here")
        if differences:
            raise ValueError(
                f"`state` was saved with another plan ({'; '.join(differences)}). To continue training from it "
                "under this manager's plan, call load_state_dict(state, allow_new_plan=True) or build "
                "CompressionManager(..., allow_new_plan=True)"
            )

    def _check_callback_states(self, state: dict[str, Any], model: nn.Module | None) -> None:
        for key, cb in zip(self._keys(), self.callbacks):
            cb.check_state(state["callbacks"][key], model)

    def _apply_state(self, state: dict[str, Any]) -> None:
        """Load a checked state (nothing here may raise on the state's content)."""
        self._step = int(state["step"])
        for key, cb in zip(self._keys(), self.callbacks):
            cb.load_state_dict(state["callbacks"][key])
        if self.attached:  # a resume is no event
            self._phases = [cb.log_phase() for cb in self.callbacks]

    # ------------------------------------------------------------------ finalize / report
    def finalize(self, model: nn.Module | None = None) -> nn.Module:
        """Bake every technique into the unwrapped model (in place) and return it.

        The result has its original module types and ``state_dict`` keys, no hooks, and loads
        with ``strict=True`` into a fresh copy of the architecture.
        """
        if not self.attached:
            raise ValueError("`finalize` needs an attached manager (call `attach` first)")
        root = unwrap_model(model) if model is not None else self._model
        if root is not self._model:
            raise ValueError("`model` is not the model this manager was attached to")
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        final_values = self.collect_log_values()  # the trained state, before it is baked in
        for cb in self.callbacks:
            cb.finalize(root)
        _ATTACHED_MODELS.discard(root)
        self._log_event("finalize", final_values)
        self._finalized = True
        self._model = None
        self._optimizer = None
        return root

    def summary(self) -> str:
        """A per-layer table of what every callback does to every module it touches (``report()`` as text).

        GradualMagnitudePruning: shape, parameters, target and measured sparsity; QuantizationAwareTraining:
        bits, ``weight_error`` (relative L2 of the fake-quant weight against the float one, while active),
        input range, folded BatchNorm; then the registered losses' last values.
        """
        from .reporting import report_table

        return report_table(self.report(), [repr(cb) for cb in self.callbacks])

    def report(self) -> dict[str, Any]:
        """``summary()`` as plain, JSON-serialisable data (for notebooks and tests).

        ``{"step": int, "techniques": {"<index>:<technique>": {"technique": name, "config": its keyword
        arguments, "layers": {module: {column: value}}}}, "losses": {loss class: {key: last value}}}``;
        shapes are lists, a value with nothing to show (``"-"`` in the table) is None. No collective:
        rank 0 alone may call it (under FSDP2 the quantization error is the one measured at the last log).

        >>> import torch, torch.nn as nn
        >>> from compress_callbacks import GradualMagnitudePruning
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> manager = CompressionManager(GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=2, initial_sparsity=0.5))
        >>> manager.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
        >>> manager.report()["techniques"]["0:GradualMagnitudePruning"]["layers"]
        {'0': {'shape': [4, 4], 'params': 16, 'target': 0.5, 'sparsity': 0.5}}
        """
        from .reporting import plain

        techniques = {}
        for key, cb in zip(self._keys(), self.callbacks):
            layers = {str(row["module"]): {k: v for k, v in row.items() if k != "module"} for row in cb.summary_rows()}
            techniques[key] = {"technique": cb.name, "config": technique_plan(cb), "layers": plain(layers)}
        losses = {type(source).__name__: {k: float(v) for k, v in source.log_values().items()} for source in self._loss_sources}
        return {"step": self._step, "techniques": techniques, "losses": losses}

    # ------------------------------------------------------------------ recipes
    @classmethod
    def from_recipe(cls, recipe: dict | str | Path, *, accelerator: Any = None, **kwargs: Any) -> CompressionManager:
        """Build a manager from a recipe dict, YAML text or a YAML file path.

        Keyword arguments (``log_every``) override the recipe's manager-level keys.
        """
        from .recipes import read_recipe

        callbacks, options = read_recipe(recipe)
        return cls(*callbacks, accelerator=accelerator, **{**options, **kwargs})

    def to_recipe(self) -> dict[str, Any]:
        """The manager's plan (``log_every`` and the callbacks) as a recipe dict (round-trips through ``from_recipe``)."""
        from .recipes import callbacks_to_recipe

        return callbacks_to_recipe(self.callbacks, log_every=self.log_every)

    def to_recipe_yaml(self) -> str:
        """``to_recipe()`` dumped as YAML text."""
        from .recipes import dump_recipe

        return dump_recipe(self.to_recipe())

    def __repr__(self) -> str:
        return f"CompressionManager({', '.join(map(repr, self.callbacks))}, step={self._step})"


def technique_plan(technique: CompressionTechnique, *, defaults: bool = False) -> dict[str, Any]:
    """A technique's keyword arguments as plain values (module types as ``"type:torch.nn.Linear"``).

    Values that are not plain (numbers, strings, None or lists of them) are left out. ``defaults``:
    the constructor's default values instead (of the arguments that have one).

    >>> from compress_callbacks import GradualMagnitudePruning
    >>> plan = technique_plan(GradualMagnitudePruning(0.5, 0, 10, modules=[torch.nn.Linear]))
    >>> plan["target_sparsity"], plan["modules"]
    (0.5, ['type:torch.nn.Linear'])
    """
    from .recipes import type_to_string

    def plain(value: Any) -> Any:
        if isinstance(value, type):
            return type_to_string(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    def is_plain(value: Any) -> bool:
        if isinstance(value, list):
            return all(is_plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str))

    if defaults:
        parameters = inspect.signature(type(technique).__init__).parameters.values()
        values = {p.name: p.default for p in parameters if p.default is not p.empty}
    else:
        values = technique.config()
    plan = {name: plain(value) for name, value in values.items()}
    return {name: value for name, value in plan.items() if is_plain(value)}


def _check_accelerator(accelerator: Any) -> None:
    if accelerator is not None and not (
        callable(getattr(accelerator, "register_for_checkpointing", None)) and hasattr(accelerator, "is_main_process")
    ):
        raise TypeError(f"`accelerator` must be an accelerate.Accelerator (or None), got {accelerator!r}")


def _require_materialized(model: nn.Module) -> None:
    """Refuse a model with tensors on the meta device (nothing to prune or observe there)."""
    on_meta = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if on_meta:
        raise ValueError(
            f"`model` has tensors on the meta device ({', '.join(repr(n) for n in on_meta[:3])}"
            f"{', ...' if len(on_meta) > 3 else ''}): materialize it (model.to_empty(device=...) and load its "
            "weights) before `attach`"
        )
