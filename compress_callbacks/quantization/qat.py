"""Quantization-aware training: fake-quant on weights (per channel or group) and layer inputs (per tensor or token).

This module holds the callback, :class:`QuantizationAwareTraining`, which decides when layers switch
and keeps their state; what a switched layer carries with it (its forward, its input-range observer,
its BatchNorm pairing) lives in :mod:`compress_callbacks.quantization.qat_layers`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _dist
from ..callback import CompressionTechnique
from ..reporting import layer_log_values, relative_l2_error
from ..targets import ModuleSpec, require_optimizer_owns_weights, select_modules
from . import fake_quant as FQ
from . import qat_layers
from .config import ACTIVATION_QMAX, ACTIVATION_QMIN, DYNAMIC_ACTIVATION_QMAX, DYNAMIC_ACTIVATION_QMIN, MAX_WEIGHT_BITS, QuantizationConfig
from .fast_path import keep_on_module_path, quantizable_modules, warn_left_out
from .qat_layers import (  # noqa: F401  (re-exported: models pickled mid-training before the split name them here)
    SUPPORTED_TYPES,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenSyncBatchNorm,
    QATConv1d,
    QATConv2d,
    QATConv3d,
    QATLinear,
    _BnConsumptionCheck,
)
from .qat_layers import (
    CONV_TYPES,
    STATE_ATTR,
    _find_conv_bn_pairs,
    _frozen_bn_class,
    _LayerState,
    _Observation,
    _qat_class,
    _RangeGroup,
    _supported_base,
)
from .lowbit import LearnedScales, check_embeddings, check_group_size, head_layers
from .spec import LayerQuantSpec, get_qparams, set_qparams

__all__ = ["QuantizationAwareTraining"]


def __getattr__(name: str) -> type:
    """``QATConv1D`` (made on first use) by its old path here, so a model pickled mid-training loads back."""
    if name == "QATConv1D":
        return qat_layers.QATConv1D
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _input_bits(st: _LayerState, activation_bits: int | None) -> int | str:
    """The summary's input column: 8, ``"8/token"`` (dynamic) or ``"-"`` (weight-only, an embedding)."""
    if st.dynamic_input:
        return f"{activation_bits}/token"
    return activation_bits if st.quantize_input else "-"


# ---------------------------------------------------------------------------------------- callback
class QuantizationAwareTraining(CompressionTechnique, config_class=QuantizationConfig):
    """Fake-quantize Linear/Conv weights and inputs from ``start_step`` on; ``finalize`` snaps to the grid.

    >>> import torch, torch.nn as nn
    >>> from compress_callbacks import CompressionManager
    >>> from compress_callbacks.quantization.spec import get_qparams
    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> qat = QuantizationAwareTraining(start_step=2, weight_bits=4)
    >>> manager = CompressionManager(qat)
    >>> manager.attach(model, optimizer)
    >>> for _ in range(5):
    ...     model(torch.randn(4, 8)).pow(2).mean().backward()
    ...     optimizer.step(); optimizer.zero_grad()
    >>> lo, hi = qat.ranges["2"]   # read-only view: the input range each layer's scale comes from
    >>> float(lo)   # layer 2's input comes out of a ReLU
    0.0
    >>> compressed = manager.finalize(model)
    >>> type(compressed[0]).__name__, sorted(get_qparams(compressed))
    ('Linear', ['0', '2'])
    >>> spec = get_qparams(compressed)["0"]
    >>> bool((compressed[0].weight / spec.weight_scale[:, None]).round().abs().max() <= 7)   # 4-bit grid
    True

    Args:
        start_step: real optimizer updates after which fake-quant is active (before it, the model
            computes exactly what it computed without the callback).
        weight_bits: 2..8; weights are symmetric per output channel, the scale following the
            channel's current ``max |w|`` (nothing is clipped; straight-through gradients).
        activation_bits: 8 (layer inputs, per tensor, affine uint8, moving-average min/max
            observers) or None (weight-only).
        freeze_observers_step: from this step on the input ranges stay fixed. At or before
            ``start_step``, each range is fixed from the first input the layer gets (under DDP: the
            union of every rank's first input, agreed on at the first update).
        freeze_bn_step: from this step on every BatchNorm uses its running statistics (and keeps
            them), even after ``model.train()``.
        modules / exclude: module names, ``"re:"`` regexes or types; default every Linear/Conv.
            ``nn.MultiheadAttention``'s ``out_proj`` is left out with a warning (the attention computes
            with its weight and never calls it; naming it is an error). An ``nn.Embedding`` named here
            (by name or type) is fake-quantized weight-only, per row (or per group).
        weight_group_size: None (one scale per output channel) or g >= 2: every g consecutive weights
            along the input dim share a symmetric scale; g must divide every layer's input features
            (Conv layers are refused).
        activation_scheme: ``"static"`` (the observed per-tensor range) or ``"dynamic"``: each token's
            own int8 range, computed at run time as torchao's 8da4w does (no observers, no state).
        learn_scales: trainable (LSQ) weight scales, initialised from the min/max grid at
            ``start_step``; ``attach`` adds them to the optimizer (see :meth:`scale_parameters`).

    With ``weight_bits`` < 8, a Transformers model's output head (``get_output_embeddings()``, and an
    embedding tied to it) keeps 8-bit weights unless named exactly in ``modules``; a weight tied
    between two targeted layers is quantized once, on one grid (see ``docs/quantization.md``).

    A Conv followed by a BatchNorm is trained with the BN folded into the fake-quantized weight
    (``q(w * gamma / sqrt(var + eps))``, running statistics), so the int8 folded conv computes what
    was trained. Observer ranges are updated once per real update with that update's observed
    min/max (all micro-batches, all ranks: ``all_reduce``), so every rank holds the same ranges; every
    rank takes part in that reduction whatever its batch (an empty one included). Values that are not
    finite (``inf``, NaN) never enter a range.

    While fake-quant is active, an ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` holding a
    targeted layer runs with PyTorch's fused eval "fast path" off, so its layers are fake-quantized in
    eval under ``no_grad`` too (see :mod:`compress_callbacks.quantization.fast_path`).

    Modules are switched in place (their class becomes a subclass whose forward fake-quantizes); the
    ``Parameter`` objects, the optimizer and DDP are untouched, and ``state_dict`` keys never change.
    Under FSDP2 (``fully_shard``) the forward sees the whole weights FSDP2 gathers for it, and
    ``finalize`` gathers each weight, snaps it and writes each rank's block back.

    Read-only view: ``ranges`` (module name -> observed input range ``(lo, hi)``) while attached.
    """

    #: weight of a new observation in the moving-average input range (torch.ao's default)
    averaging_constant: float = 0.01
    supports_sharded_weights = True  # FSDP2: fake-quant runs on the whole weights of the forward

    def __init__(
        self,
        start_step: int = 0,
        weight_bits: int = 8,
        activation_bits: int | None = 8,
        freeze_observers_step: int | None = None,
        freeze_bn_step: int | None = None,
        modules: ModuleSpec = None,
        exclude: ModuleSpec = None,
        weight_group_size: int | None = None,
        activation_scheme: str = "static",
        learn_scales: bool = False,
    ) -> None:
        super().__init__()
        self.settings = QuantizationConfig(
            start_step=start_step, weight_bits=weight_bits, activation_bits=activation_bits,
            freeze_observers_step=freeze_observers_step, freeze_bn_step=freeze_bn_step, modules=modules, exclude=exclude,
            weight_group_size=weight_group_size, activation_scheme=activation_scheme, learn_scales=learn_scales,
        )
        self._learned = LearnedScales() if self.settings.learn_scales else None
        self.needs_before_update = self._learned is not None  # averages the scales' gradients under DDP
        self.adds_optimizer_parameters = self._learned is not None  # the scales join the optimizer at attach

        self._root: nn.Module | None = None
        self._layers: list[_LayerState] = []
        self._groups: list[_RangeGroup] = []
        self._batchnorms: list[_BatchNorm] = []
        self._active = False
        self._observation = _Observation()  # shared with the layers' forward (not the callback itself)
        self._observing = False
        self._observed = False  # a training forward recorded input ranges since the last update
        self._ranges_started = False  # every input range started (as of the last update: the same on every rank)
        self._bn_frozen = False
        self._leave_module_path: Callable[[], None] | None = None  # undoes keep_on_module_path
        self._loaded: dict[str, Any] | None = None
        self._final_rows: list[dict[str, Any]] = []

    @property
    def _observing(self) -> bool:
        return self._observation.observing

    @_observing.setter
    def _observing(self, value: bool) -> None:
        self._observation.observing = value

    @property
    def _observed(self) -> bool:
        return self._observation.observed

    @_observed.setter
    def _observed(self, value: bool) -> None:
        self._observation.observed = value

    # ------------------------------------------------------------------ lifecycle
    def target_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs this callback fake-quantizes on ``model`` (unwrapped).

        The selection of ``modules`` / ``exclude``, less the layers whose parent reads their weight
        itself (``nn.MultiheadAttention``'s ``out_proj``: see :mod:`.fast_path`).
        """
        return self._selection(model, warn_shared=False)[0]

    def _selection(self, model: nn.Module, *, warn_shared: bool) -> tuple[list[tuple[str, nn.Module]], list[str]]:
        names, skipped = quantizable_modules(model, modules=self.modules, exclude=self.exclude, warn_shared=warn_shared)
        named = dict(model.named_modules())
        return [(name, named[name]) for name in names], skipped

    def validate(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        selected = self._selection(model, warn_shared=True)[0]
        for name, module in selected:
            if STATE_ATTR in module.__dict__:
                raise ValueError(f"`modules`: {name!r} is already fake-quantized by another QuantizationAwareTraining")
            if _supported_base(module) is None:
                raise ValueError(
                    f"`modules`: {name!r} is a {type(module).__name__}; QuantizationAwareTraining supports "
                    "nn.Linear, nn.Conv1d/2d/3d, Transformers Conv1D and (named) nn.Embedding (and subclasses that keep "
                    "their forward); exclude it "
                    f"with `exclude=[{name!r}]`"
                )
            if not module.weight.is_floating_point():
                raise ValueError(f"`modules`: {name!r} has a {module.weight.dtype} weight; fake-quant needs floats")
        check_group_size(selected, self.weight_group_size)
        check_embeddings(selected)
        require_optimizer_owns_weights(selected, optimizer)
        if self._learned is not None and _dist.world_size() > 1 and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                "learn_scales=True under DDP needs a torch optimizer (or a wrapper of one) at `attach`: its pre-step "
                "hook averages the scales' gradients over the ranks (DDP never sees the scales), and "
                f"{type(optimizer).__name__} has none, so every rank would train its own scales"
            )

    def on_attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        selected, skipped = self._selection(model, warn_shared=False)  # validate warned
        warn_left_out(type(self).__name__, skipped, stacklevel=3)  # at the user's manager.attach
        self._root = model
        self._layers = [_LayerState(self, name, module, _supported_base(module)) for name, module in selected]
        self._attach_lowbit(model, selected, optimizer)
        convs = {id(st.module): st.name for st in self._layers if issubclass(st.base, CONV_TYPES)}
        self._set_bn_pairs(_find_conv_bn_pairs(model, convs))
        self._batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        self._build_groups()
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        self._sync(step)

    def _attach_lowbit(self, model: nn.Module, selected: list[tuple[str, nn.Module]], optimizer) -> None:
        """The output head's bit width, tied weights and learned scales (see :mod:`.lowbit`)."""
        kept = head_layers(model, selected, self.modules, self.weight_bits)
        if kept:
            warnings.warn(
                f"QuantizationAwareTraining: keeping the output head {kept} at {MAX_WEIGHT_BITS}-bit weights "
                f"(weight_bits={self.weight_bits} for the other layers); name it in `modules` to quantize it at "
                f"{self.weight_bits} bits",
                stacklevel=4,
            )
        first_holder: dict[int, str] = {}
        for st in self._layers:
            if st.name in kept:
                st.bits = MAX_WEIGHT_BITS
            holder = first_holder.setdefault(id(st.module.weight), st.name)
            st.tied_to = holder if holder != st.name else None
        if self._learned is not None:
            self._learned.create(self._layers)
            self._learned.add_to(optimizer)

    def scale_parameters(self) -> list[nn.Parameter]:
        """The trainable weight scales of ``learn_scales=True`` (empty otherwise, or before ``attach``).

        ``attach`` adds them to the optimizer it is given: to its first param group without weight
        decay (the Transformers Trainer's bias / norm group), else to its first group, so they follow
        that group's learning rate and schedule. Pass them yourself to an optimizer made after
        ``attach``. The Transformers ``CompressionCallback`` attaches when ``train`` creates the
        optimizer, so a resumed run's optimizer state finds them (see ``docs/quantization.md``).

        They are initialized from the weights' min/max grid when fake-quant starts (``start_step``)
        and saved in this callback's ``state_dict``. With Adam-like optimizers a scale moves by about
        the learning rate per update: keep it well below the scales (``max |w| / qmax``, ~1e-2 for
        4-bit LLM weights).
        """
        return list(self._learned.parameters) if self._learned is not None else []

    @torch.compiler.disable
    def on_before_update(self, step: int) -> None:
        if self._learned is not None:
            self._learned.average_gradients()

    @torch.compiler.disable  # outside compiled graphs: runs eagerly between them, nothing recompiles
    def on_update(self, step: int) -> None:
        if self._learned is not None:
            self._learned.clear_gradients()
        if self._groups and self._must_fold():
            for group in self._groups:
                first = group.update(self.averaging_constant)
                members = [st for st in self._layers if st.group is group]
                if not all(st.initialized for st in members):  # started in a compiled forward or on another rank
                    started = first.tolist()
                    for st in members:
                        st.initialized = st.initialized or started[st.slot]
            self._observed = False
            self._ranges_started = all(st.initialized for st in self._layers if st.group is not None)
        for st in self._layers:  # a pairing checked in compiled forwards, which cannot remove the hook
            if st.check_bn and st.bn_seen:
                st.settle_bn_check(st.bn_consumed)
        self._sync(step)

    def _must_fold(self) -> bool:
        """Whether this update folds observations. Under DDP the answer is the same on every rank
        (the fold reduces over ranks): while active, when the observers run or a range is yet to start."""
        if _dist.world_size() > 1:
            return self._active and (self._observing or not self._ranges_started)
        return self._observed or any(g.fresh for g in self._groups)

    def finalize(self, model: nn.Module) -> None:
        self._final_rows = self.summary_rows()  # before snapping: the trained weights' quantization error
        specs: dict[str, LayerQuantSpec] = {}
        never_observed = []
        with torch.no_grad():
            for st in self._layers:
                module = st.module
                scale = st.weight_scale(module) if st.tied_to is None else specs[st.tied_to].weight_scale
                if st.tied_to is None:  # a tied weight is snapped once, by its first holder
                    snapped = st.weight(module)  # exactly the weight the fake-quant forward used
                    _dist.local(module.weight).copy_(_dist.local_block_of(snapped, module.weight))
                quantized_input = st.quantize_input and st.initialized
                if st.quantize_input and not st.initialized:
                    never_observed.append(st.name)
                specs[st.name] = LayerQuantSpec(
                    weight_bits=st.bits,
                    weight_scale=scale.detach().to("cpu", torch.float32),
                    activation_bits=self.activation_bits if quantized_input or st.dynamic_input else None,
                    input_scale=float(st.group.scale[st.slot]) if quantized_input else None,
                    input_zero_point=int(st.group.zero_point[st.slot]) if quantized_input else None,
                    activation_qmin=DYNAMIC_ACTIVATION_QMIN if st.dynamic_input else ACTIVATION_QMIN,
                    activation_qmax=DYNAMIC_ACTIVATION_QMAX if st.dynamic_input else ACTIVATION_QMAX,
                    bn=st.bn_name,
                    weight_axis=1 if st.input_first else 0,
                    weight_group_size=st.group_size,
                    activation_scheme="dynamic" if st.dynamic_input else "static",
                    tied_to=st.tied_to,
                )
        if never_observed:
            warnings.warn(
                f"QuantizationAwareTraining: {never_observed[:5]} never saw an input while fake-quant was active "
                "(finalize before start_step?); their inputs stay float (weight-only spec)",
                stacklevel=2,
            )
        self._set_active(False)
        self._set_bn_frozen(False)
        set_qparams(model, {**get_qparams(model), **specs})
        self._layers, self._groups, self._batchnorms, self._root = [], [], [], None
        if self._learned is not None:
            self._learned.parameters = []

    # ------------------------------------------------------------------ switching
    def _sync(self, step: int) -> None:
        """Make the model's state match ``step`` (idempotent; also rewinds after a resume)."""
        self._set_active(step >= self.start_step)
        self._observing = self.freeze_observers_step is None or step < self.freeze_observers_step
        self._set_bn_frozen(self.freeze_bn_step is not None and step >= self.freeze_bn_step)

    def _set_active(self, active: bool) -> None:
        if active == self._active:
            return
        if active and self._learned is not None and not self._learned.initialized:
            self._learned.initialize(self._layers)  # from the weights as they are when fake-quant starts
        for st in self._layers:
            module = st.module
            if active:
                module.__dict__[STATE_ATTR] = st
                module.__class__ = _qat_class(st.original_class)
            else:
                module.__class__ = st.original_class
                module.__dict__.pop(STATE_ATTR, None)
            self._set_bn_check(st, active and st.bn is not None)
        if active:  # a Transformer layer's fused eval path would skip the fake-quantized children
            self._leave_module_path = keep_on_module_path(self._root, [st.name for st in self._layers])
        elif self._leave_module_path is not None:
            self._leave_module_path()
            self._leave_module_path = None
        self._active = active

    def _set_bn_frozen(self, frozen: bool) -> None:
        if frozen == self._bn_frozen:
            return
        training = self._root.training if self._root is not None else True
        for bn in self._batchnorms:
            original = getattr(type(bn), "_compress_original_class", type(bn))
            bn.__class__ = _frozen_bn_class(original) if frozen else original
            bn.training = False if frozen else training
        self._bn_frozen = frozen

    def _set_bn_pairs(self, pairs: dict[str, str | None]) -> None:
        for st in self._layers:
            st.bn_name = pairs.get(st.name)
            st.bn = self._root.get_submodule(st.bn_name) if st.bn_name else None

    def _set_bn_check(self, st: _LayerState, on: bool) -> None:
        st.set_bn_check(on)

    def _build_groups(self) -> None:
        by_device: dict[torch.device, list[_LayerState]] = {}
        for st in self._layers:
            if st.quantize_input:
                by_device.setdefault(st.module.weight.device, []).append(st)
        self._groups = []
        for device, members in by_device.items():
            group = _RangeGroup(len(members), device)
            for slot, st in enumerate(members):
                st.group, st.slot = group, slot
                st.qparams = group.views(slot)
            self._groups.append(group)

    # ------------------------------------------------------------------ state
    def _per_layer(self, attr: str) -> torch.Tensor:
        values = [getattr(st.group, attr)[st.slot].to("cpu") if st.group else torch.tensor(0.0) for st in self._layers]
        return torch.stack(values) if values else torch.zeros(0)

    def state_dict(self) -> dict[str, Any]:
        return {
            "names": [st.name for st in self._layers],
            "bn": [st.bn_name for st in self._layers],
            "initialized": [st.initialized for st in self._layers],
            "running_min": self._per_layer("running_min"),
            "running_max": self._per_layer("running_max"),
            "observed_min": self._per_layer("observed_min"),
            "observed_max": self._per_layer("observed_max"),
            "active": self._active,
            "observers_frozen": not self._observing,
            "bn_frozen": self._bn_frozen,
            **(self._learned.state() if self._learned is not None else {}),
        }

    def check_state(self, state: dict[str, Any], model: nn.Module | None) -> None:
        super().check_state(state, model)
        keys = ("names", "bn", "initialized", "running_min", "running_max", "observed_min", "observed_max")
        if any(key not in state for key in keys):
            raise ValueError(f"`state` of {self.name} lacks {[k for k in keys if k not in state]}: not its state_dict()")
        names = list(state["names"])
        if any(len(state[key]) != len(names) or (key[0] in "ro" and not torch.is_tensor(state[key])) for key in keys[1:]):
            raise ValueError(f"`state` of {self.name}: {keys[1:]} must hold one entry per module name ({len(names)})")
        if self._learned is not None:
            if "scales" not in state or "scales_initialized" not in state:
                raise ValueError(f"`state` of {self.name} holds no learned scales: it was saved without learn_scales=True")
            mine = self._learned.parameters
            if mine and [tuple(t.shape) for t in state["scales"]] != [tuple(p.shape) for p in mine]:
                raise ValueError(f"`state` of {self.name}: its learned scales do not fit this model's layers")
        root = self._root if self._layers else model
        if root is None:
            return
        targets = [st.name for st in self._layers] or [n for n, _ in select_modules(root, modules=self.modules, exclude=self.exclude)]
        if names != targets:
            raise ValueError(f"`state` of {self.name} holds ranges for modules {names[:4]}..., this model's targets are {targets[:4]}...")
        modules = dict(root.named_modules())
        for bn_name in state["bn"]:
            if bn_name is not None and not isinstance(modules.get(bn_name), _BatchNorm):
                raise ValueError(f"`state` of {self.name}: {bn_name!r} (a folded BatchNorm) is no BatchNorm of this model")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._layers:
            self._restore(state)
            self._sync(self.manager.step if self.manager is not None else 0)
        else:
            self._loaded = state

    def _restore(self, state: dict[str, Any]) -> None:
        self.check_state(state, None)
        names = [st.name for st in self._layers]
        self._set_bn_pairs(dict(zip(names, state["bn"])))
        for i, st in enumerate(self._layers):
            st.initialized = bool(state["initialized"][i])
            if st.group is not None:
                for attr in ("running_min", "running_max", "observed_min", "observed_max"):
                    getattr(st.group, attr)[st.slot] = state[attr][i]
                st.group.set_started(st.slot, st.initialized)
        if self._learned is not None:
            self._learned.load(state)
        for group in self._groups:
            group.fresh.clear()
            group.refresh_qparams()
        self._observed = False
        self._ranges_started = all(st.initialized for st in self._layers if st.group is not None)
        if self._active:  # pairing may have changed: re-verify on the next forward
            for st in self._layers:
                self._set_bn_check(st, st.bn is not None)

    # ------------------------------------------------------------------ reporting
    def log_values(self) -> dict[str, float]:
        """The phase flags (``active``, ``observers_frozen``, ``bn_frozen``); while active the weight
        quantization error (relative L2 of each fake-quant weight against its float weight:
        ``weight_error/<statistic>`` over the layers, ``layer/<module>/weight_error``); the observed input
        ranges (``input_min/min``, ``input_max/max`` over the layers, ``layer/<module>/input_min`` /
        ``input_max``). Per-layer keys for up to ``max_layer_keys`` layers."""
        if not self._layers:
            return {}
        values = {
            "active": float(self._active),
            "observers_frozen": float(not self._observing),
            "bn_frozen": float(self._bn_frozen),
        }
        if self._active:
            values.update(layer_log_values("weight_error", self._weight_errors(), self.max_layer_keys))
        lows, highs = self._input_ranges()
        if lows:
            values["input_min/min"], values["input_max/max"] = min(lows.values()), max(highs.values())
            if len(self._layers) <= self.max_layer_keys:
                for name in lows:
                    values[f"layer/{name}/input_min"], values[f"layer/{name}/input_max"] = lows[name], highs[name]
        return values

    def log_phase(self) -> Any:
        return (self._active, self._observing, self._bn_frozen)

    def _input_ranges(self) -> tuple[dict[str, float], dict[str, float]]:
        """The observed input ranges as floats (one host copy per range group)."""
        copies = {id(g): (g.running_min.tolist(), g.running_max.tolist()) for g in self._groups}
        observed = [st for st in self._layers if st.group is not None and st.initialized]
        lows = {st.name: copies[id(st.group)][0][st.slot] for st in observed}
        highs = {st.name: copies[id(st.group)][1][st.slot] for st in observed}
        return lows, highs

    def _weight_errors(self) -> dict[str, float]:
        """Relative L2 error of each layer's fake-quant weight (what its forward computes with) against the
        float weight, measured now over the whole weights: under FSDP2 a collective (every rank calls
        ``log_values``), and ``summary_rows`` shows this last measurement."""
        with torch.no_grad():
            errors = {st.name: relative_l2_error(st.weight(st.module), _dist.whole(st.module.weight)) for st in self._layers}
        self._measured_weight_errors = errors
        return errors

    def summary_rows(self) -> list[dict[str, Any]]:
        if not self._layers:
            return self._final_rows
        sharded = any(_dist.is_sharded(st.module.weight) for st in self._layers)
        if not self._active:
            errors = {}
        elif sharded:  # no collective here: rank 0 alone may call summary()
            errors = getattr(self, "_measured_weight_errors", {})
        else:
            errors = self._weight_errors()
        lows, highs = self._input_ranges()
        rows = []
        for st in self._layers:
            rows.append(
                {
                    "module": st.name,
                    "type": st.original_class.__name__,
                    "shape": tuple(st.module.weight.shape),
                    "weight_bits": st.bits,
                    "weight_error": errors.get(st.name, "-"),
                    "input_bits": _input_bits(st, self.activation_bits),
                    "input_min": lows.get(st.name, "-"),
                    "input_max": highs.get(st.name, "-"),
                    "folded_bn": st.bn_name or "-",
                    **({"weight_group": st.group_size} if self.weight_group_size is not None else {}),
                }
            )
        return rows

    # ------------------------------------------------------------------ read-only views
    @property
    def ranges(self) -> Mapping[str, tuple[torch.Tensor, torch.Tensor]]:
        """The learned input ranges by module name (a read-only mapping): ``(lo, hi)``, the float32
        moving-average min/max from which each layer's input scale and zero point are computed.

        Copies (0-dim tensors on the layer's device). Only layers whose input has been observed are
        listed: none with ``activation_bits=None``, none before ``start_step``, none after
        ``finalize`` (the ranges then live in the model's specs, ``get_qparams(model)``).
        """
        return MappingProxyType({
            st.name: (st.group.running_min[st.slot].clone(), st.group.running_max[st.slot].clone())
            for st in self._layers
            if st.group is not None and st.initialized
        })
