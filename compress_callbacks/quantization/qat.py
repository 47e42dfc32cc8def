"""Quantization-aware training: fake-quant on weights (per channel) and layer inputs (per tensor)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _dist
from ..callback import CompressionTechnique
from ..targets import ModuleSpec, require_optimizer_owns_weights, select_modules
from . import fake_quant as FQ
from .config import ACTIVATION_QMAX, ACTIVATION_QMIN, QuantizationConfig
from .grid import bn_fold_factor, channel_view
from .observer import RangeObserver, tensor_range
from .spec import LayerQuantSpec, get_qparams, set_qparams

__all__ = ["QuantizationAwareTraining"]

STATE_ATTR = "_compress_qat"  # plain attribute on a fake-quantized module (not a buffer: state_dict unchanged)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED_TYPES = (nn.Linear,) + CONV_TYPES


# ---------------------------------------------------------------------------------------- forward
class _LayerState:
    """What one fake-quantized layer reads in its forward; lives in the module's ``__dict__``."""

    def __init__(self, owner: QuantizationAwareTraining, name: str, module: nn.Module, base: type) -> None:
        self.owner = owner
        self.name = name
        self.module = module
        self.base = base  # nn.Linear / nn.Conv*d: the forward we replace
        self.original_class = type(module)
        self.bits = owner.weight_bits
        self.quantize_input = owner.activation_bits is not None
        self.bn: _BatchNorm | None = None
        self.bn_name: str | None = None
        self.check_bn = False  # verify on the next forward that the BN really consumes this conv's output
        self.last_output: torch.Tensor | None = None
        self.bn_hook: Any = None
        self.initialized = False  # input range observed at least once
        self.group: _RangeGroup | None = None
        self.slot = 0  # index in the group's packed tensors
        self.qparams: tuple[torch.Tensor, ...] = ()  # (scale, inv_scale, qlo, qhi): views into the group

    def bn_factor(self) -> torch.Tensor:
        bn = self.bn
        return bn_fold_factor(_dist.whole(bn.weight), bn.running_var, bn.eps)

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The fake-quantized weight the layer computes with (BN-folded grid when paired).

        In the forward pass FSDP2 has put whole weights in place; outside it (``finalize``) a
        sharded weight is gathered whole here.
        """
        weight = _dist.whole(module.weight)
        if self.bn is None:
            return FQ.fake_quantize_weight(weight, self.bits)
        return FQ.fold_bn_fake_quantize_weight(weight, self.bn_factor(), self.bits)

    def grid_weight(self, module: nn.Module) -> torch.Tensor:
        """The weight whose per-channel grid is quantized: ``w``, or ``w * bn_factor`` when folded."""
        weight = _dist.whole(module.weight)
        if self.bn is None:
            return weight
        return weight * channel_view(self.bn_factor(), weight.dim())

    def input(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if not self.quantize_input or x.numel() == 0:
            return x
        owner = self.owner
        observe = training and owner._observing
        if observe or not self.initialized:
            with torch.no_grad():
                lo, hi = tensor_range(x)
                group = self.group
                if not self.initialized:
                    group.initialize(self.slot, lo, hi)
                    self.initialized = True
                if observe:
                    group.record(self.slot, lo, hi)
                    owner._observed = True
        return FQ.fake_quantize_activation_with_bounds(x, *self.qparams)


def _qat_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    state = self.__dict__[STATE_ATTR]
    return F.linear(state.input(input, self.training), state.weight(self), self.bias)


def _qat_conv_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    state = self.__dict__[STATE_ATTR]
    out = self._conv_forward(state.input(input, self.training), state.weight(self), self.bias)
    if state.check_bn:
        state.last_output = out
    return out


def _frozen_bn_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """``train()`` of a frozen BatchNorm: stays in eval-statistics mode."""
    self.training = False
    return self


_QAT_CLASSES: dict[type, type] = {}
_FROZEN_BN_CLASSES: dict[type, type] = {}


def _subclass(cache: dict[type, type], cls: type, prefix: str, namespace: dict[str, Any]) -> type:
    if cls not in cache:
        sub = type(prefix + cls.__name__, (cls,), dict(namespace, _compress_original_class=cls))
        sub.__module__ = __name__
        cache[cls] = sub
    return cache[cls]


def _qat_class(cls: type) -> type:
    forward = _qat_linear_forward if issubclass(cls, nn.Linear) else _qat_conv_forward
    return _subclass(_QAT_CLASSES, cls, "QAT", {"forward": forward})


def _frozen_bn_class(cls: type) -> type:
    return _subclass(_FROZEN_BN_CLASSES, cls, "Frozen", {"train": _frozen_bn_train})


# module-level names so a model pickled mid-training (torch.save(model)) can be loaded back
QATLinear, QATConv1d, QATConv2d, QATConv3d = (_qat_class(c) for c in SUPPORTED_TYPES)
FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenSyncBatchNorm = (
    _frozen_bn_class(c) for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
)


# ---------------------------------------------------------------------------------------- observers
class _RangeGroup(RangeObserver):
    """Input-range observers of the layers on one device, packed so a real update costs a few ops.

    Adds to the shared :class:`~compress_callbacks.quantization.observer.RangeObserver` the layers'
    activation qparams (views of which the forward reads) and the reduction over ranks.
    """

    def __init__(self, size: int, device: torch.device) -> None:
        super().__init__(size, device)

        def full(value: float) -> torch.Tensor:
            return torch.full((size,), value, dtype=torch.float32, device=device)

        self.scale, self.inv_scale, self.qlo, self.qhi = full(1.0), full(1.0), full(0.0), full(0.0)
        self.zero_point = torch.zeros(size, dtype=torch.int32, device=device)
        self.fresh: list[int] = []  # slots first initialized since the last update

    def views(self, slot: int) -> tuple[torch.Tensor, ...]:
        """``(scale, inv_scale, qlo, qhi)`` of one layer: views that follow every refresh."""
        return tuple(t[slot : slot + 1] for t in (self.scale, self.inv_scale, self.qlo, self.qhi))

    def set_qparams(self, index: slice | int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zero_point = FQ.activation_qparams(lo, hi, ACTIVATION_QMIN, ACTIVATION_QMAX)
        inv_scale, qlo, qhi = FQ.activation_bounds(scale, zero_point, ACTIVATION_QMIN, ACTIVATION_QMAX)
        for target, value in zip(
            (self.scale, self.zero_point, self.inv_scale, self.qlo, self.qhi), (scale, zero_point, inv_scale, qlo, qhi)
        ):
            target[index] = value

    def initialize(self, slot: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.running_min[slot] = lo
        self.running_max[slot] = hi
        self.set_qparams(slot, lo, hi)
        self.fresh.append(slot)

    @torch.no_grad()
    def update(self, averaging_constant: float) -> None:
        """Fold this update's observations (reduced over ranks) into the moving averages."""
        if _dist.world_size() > 1:
            size = self.observed_min.numel()
            packed = torch.cat([-self.observed_min, self.observed_max])
            _dist.all_reduce_(packed, "max")
            self.observed_min.copy_(-packed[:size])
            self.observed_max.copy_(packed[size:])
        self.fold_moving_average(averaging_constant, self.fresh)
        self.refresh_qparams()
        self.fresh.clear()

    def refresh_qparams(self) -> None:
        self.set_qparams(slice(None), self.running_min, self.running_max)


# ---------------------------------------------------------------------------------------- helpers
def _supported_base(module: nn.Module) -> type | None:
    """The Linear/Conv base whose forward ``module`` uses unchanged (None: unsupported)."""
    for base in SUPPORTED_TYPES:
        if isinstance(module, base):
            return base if type(module).forward is base.forward else None
    return None


def _find_conv_bn_pairs(root: nn.Module, convs: dict[int, str]) -> dict[str, str]:
    """``{conv name: bn name}`` for targeted convs registered right before a BatchNorm of matching width.

    (``nn.Sequential(conv, bn)``, torchvision's ``conv1``/``bn1``, ...). The first QAT forward
    checks that the BatchNorm really consumes the conv's output and unpairs it otherwise.
    """
    pairs: dict[str, str] = {}
    taken: set[int] = set()
    for parent_name, parent in root.named_modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if (
                id(conv) in convs
                and isinstance(bn, _BatchNorm)
                and bn.track_running_stats
                and bn.running_var is not None
                and bn.num_features == conv.out_channels
                and id(bn) not in taken
            ):
                taken.add(id(bn))
                pairs[convs[id(conv)]] = f"{parent_name}.{bn_name}" if parent_name else bn_name
    return pairs


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
        freeze_observers_step: from this step on the input ranges stay fixed.
        freeze_bn_step: from this step on every BatchNorm uses its running statistics (and keeps
            them), even after ``model.train()``.
        modules / exclude: module names, ``"re:"`` regexes or types; default every Linear/Conv.

    A Conv followed by a BatchNorm is trained with the BN folded into the fake-quantized weight
    (``q(w * gamma / sqrt(var + eps))``, running statistics), so the int8 folded conv computes what
    was trained. Observer ranges are updated once per real update with that update's observed
    min/max (all micro-batches, all ranks: ``all_reduce``), so every rank holds the same ranges.

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
    ) -> None:
        super().__init__()
        self.settings = QuantizationConfig(
            start_step=start_step, weight_bits=weight_bits, activation_bits=activation_bits,
            freeze_observers_step=freeze_observers_step, freeze_bn_step=freeze_bn_step, modules=modules, exclude=exclude,
        )

        self._root: nn.Module | None = None
        self._layers: list[_LayerState] = []
        self._groups: list[_RangeGroup] = []
        self._batchnorms: list[_BatchNorm] = []
        self._active = False
        self._observing = False
        self._observed = False  # a training forward recorded input ranges since the last update
        self._bn_frozen = False
        self._loaded: dict[str, Any] | None = None
        self._final_rows: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ lifecycle
    def validate(self, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        selected = select_modules(model, modules=self.modules, exclude=self.exclude)
        for name, module in selected:
            if STATE_ATTR in module.__dict__:
                raise ValueError(f"`modules`: {name!r} is already fake-quantized by another QuantizationAwareTraining")
            if _supported_base(module) is None:
                raise ValueError(
                    f"`modules`: {name!r} is a {type(module).__name__}; QuantizationAwareTraining supports "
                    "nn.Linear and nn.Conv1d/2d/3d (and subclasses that keep their forward); exclude it "
                    f"with `exclude=[{name!r}]`"
                )
            if not module.weight.is_floating_point():
                raise ValueError(f"`modules`: {name!r} has a {module.weight.dtype} weight; fake-quant needs floats")
        require_optimizer_owns_weights(selected, optimizer)

    def on_attach(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        selected = select_modules(model, modules=self.modules, exclude=self.exclude)
        self._root = model
        self._layers = [_LayerState(self, name, module, _supported_base(module)) for name, module in selected]
        convs = {id(st.module): st.name for st in self._layers if issubclass(st.base, CONV_TYPES)}
        self._set_bn_pairs(_find_conv_bn_pairs(model, convs))
        self._batchnorms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        self._build_groups()
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        self._sync(step)

    def on_update(self, step: int) -> None:
        if self._observed or any(g.fresh for g in self._groups):
            for group in self._groups:
                group.update(self.averaging_constant)
            self._observed = False
        self._sync(step)

    def finalize(self, model: nn.Module) -> None:
        specs: dict[str, LayerQuantSpec] = {}
        never_observed = []
        with torch.no_grad():
            for st in self._layers:
                module = st.module
                scale = FQ.per_channel_weight_scale(st.grid_weight(module), st.bits)
                snapped = st.weight(module)  # exactly the weight the fake-quant forward used
                _dist.local(module.weight).copy_(_dist.local_block_of(snapped, module.weight))
                quantized_input = st.quantize_input and st.initialized
                if st.quantize_input and not st.initialized:
                    never_observed.append(st.name)
                specs[st.name] = LayerQuantSpec(
                    weight_bits=st.bits,
                    weight_scale=scale.detach().to("cpu", torch.float32),
                    activation_bits=self.activation_bits if quantized_input else None,
                    input_scale=float(st.group.scale[st.slot]) if quantized_input else None,
                    input_zero_point=int(st.group.zero_point[st.slot]) if quantized_input else None,
                    activation_qmin=ACTIVATION_QMIN,
                    activation_qmax=ACTIVATION_QMAX,
                    bn=st.bn_name,
                )
        if never_observed:
            warnings.warn(
                f"QuantizationAwareTraining: {never_observed[:5]} never saw an input while fake-quant was active "
                "(finalize before start_step?); their inputs stay float (weight-only spec)",
                stacklevel=2,
            )
        self._final_rows = self.summary_rows()
        self._set_active(False)
        self._set_bn_frozen(False)
        set_qparams(model, {**get_qparams(model), **specs})
        self._layers, self._groups, self._batchnorms, self._root = [], [], [], None

    # ------------------------------------------------------------------ switching
    def _sync(self, step: int) -> None:
        """Make the model's state match ``step`` (idempotent; also rewinds after a resume)."""
        self._set_active(step >= self.start_step)
        self._observing = self.freeze_observers_step is None or step < self.freeze_observers_step
        self._set_bn_frozen(self.freeze_bn_step is not None and step >= self.freeze_bn_step)

    def _set_active(self, active: bool) -> None:
        if active == self._active:
            return
        for st in self._layers:
            module = st.module
            if active:
                module.__dict__[STATE_ATTR] = st
                module.__class__ = _qat_class(st.original_class)
            else:
                module.__class__ = st.original_class
                module.__dict__.pop(STATE_ATTR, None)
            self._set_bn_check(st, active and st.bn is not None)
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
        if st.bn_hook is not None:
            st.bn_hook.remove()
            st.bn_hook = None
        st.check_bn, st.last_output = on, None
        if on:

            def check(bn: nn.Module, args: tuple, st: _LayerState = st) -> None:
                consumed = bool(args) and args[0] is st.last_output
                if not consumed:
                    warnings.warn(
                        f"QuantizationAwareTraining: {st.bn_name!r} does not consume the output of {st.name!r}; "
                        "training it without BatchNorm folding",
                        stacklevel=2,
                    )
                    st.bn, st.bn_name = None, None
                self._set_bn_check(st, False)

            st.bn_hook = st.bn.register_forward_pre_hook(check)

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._layers:
            self._restore(state)
            self._sync(self.manager.step if self.manager is not None else 0)
        else:
            self._loaded = state

    def _restore(self, state: dict[str, Any]) -> None:
        names = [st.name for st in self._layers]
        if list(state["names"]) != names:
            raise ValueError(f"`state` holds QAT ranges for modules {state['names'][:3]}..., this model has {names[:3]}...")
        self._set_bn_pairs(dict(zip(names, state["bn"])))
        for i, st in enumerate(self._layers):
            st.initialized = bool(state["initialized"][i])
            if st.group is not None:
                for attr in ("running_min", "running_max", "observed_min", "observed_max"):
                    getattr(st.group, attr)[st.slot] = state[attr][i]
        for group in self._groups:
            group.fresh.clear()
            group.refresh_qparams()
        self._observed = False
        if self._active:  # pairing may have changed: re-verify on the next forward
            for st in self._layers:
                self._set_bn_check(st, st.bn is not None)

    # ------------------------------------------------------------------ reporting
    def log_values(self) -> dict[str, float]:
        if not self._layers:
            return {}
        return {
            "active": float(self._active),
            "observers_frozen": float(not self._observing),
            "bn_frozen": float(self._bn_frozen),
        }

    def summary_rows(self) -> list[dict[str, Any]]:
        if not self._layers:
            return self._final_rows
        rows = []
        for st in self._layers:
            observed = st.group is not None and st.initialized
            rows.append(
                {
                    "module": st.name,
                    "type": st.original_class.__name__,
                    "shape": tuple(st.module.weight.shape),
                    "weight_bits": st.bits,
                    "input_bits": self.activation_bits or "-",
                    "input_min": float(st.group.running_min[st.slot]) if observed else "-",
                    "input_max": float(st.group.running_max[st.slot]) if observed else "-",
                    "folded_bn": st.bn_name or "-",
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
