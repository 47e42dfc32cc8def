"""The per-layer machinery of quantization-aware training: what a fake-quantized layer reads and runs.

:class:`~compress_callbacks.quantization.qat.QuantizationAwareTraining` (the callback, in ``qat.py``)
decides when layers switch; this module holds what the switched layers carry with them, so that a model
pickles and deep-copies mid-training without the callback: each layer's :class:`_LayerState`, the
patched forwards and the ``QAT*`` / ``Frozen*`` subclasses, the packed input-range observers
(:class:`_RangeGroup`) and the BatchNorm pairing.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _dist
from ..targets import transformers_conv1d_class
from . import fake_quant as FQ
from .config import ACTIVATION_QMAX, ACTIVATION_QMIN
from .grid import bn_fold_factor, channel_view
from .observer import RangeObserver, tensor_range

if TYPE_CHECKING:
    from .qat import QuantizationAwareTraining

STATE_ATTR = "_compress_qat"  # plain attribute on a fake-quantized module (not a buffer: state_dict unchanged)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED_TYPES = (nn.Linear,) + CONV_TYPES
EMBEDDING_TYPES = (nn.Embedding,)  # weight-only, per row (or group), when named in `modules`


# ---------------------------------------------------------------------------------------- forward
class _Observation:
    """Flags the layers of one callback share in their forward: whether training forwards record input
    ranges, and whether one did since the last update.

    The layers hold this, not the callback: a model pickles (``torch.save(model)``) and deep-copies (an
    EMA copy) mid-training without the callback, its manager and the optimizer's state.
    """

    __slots__ = ("observing", "observed")

    def __init__(self) -> None:
        self.observing = False
        self.observed = False


class _BnConsumptionCheck:
    """Forward pre-hook of the BatchNorm paired with a conv: on its first call, unpair the two unless the
    BatchNorm's input is the conv's output (a class, not a closure, so that the model pickles).

    Inside a ``torch.compile`` graph it only notes what it saw (constants written, nothing read, so
    nothing to guard on): a hook cannot be removed inside a graph. The next real update settles it
    (:meth:`_LayerState.settle_bn_check`, from the callback's ``on_update``, outside graphs).
    """

    def __init__(self, state: _LayerState) -> None:
        self.state = state

    def __call__(self, bn: nn.Module, args: tuple) -> None:
        st = self.state
        consumed = bool(args) and args[0] is st.last_output
        if FQ._compiling():
            st.bn_seen = True
            if not consumed:
                st.bn_consumed = False
            return
        st.settle_bn_check(consumed)


class _LayerState:
    """What one fake-quantized layer reads in its forward; lives in the module's ``__dict__``.

    It refers to the model's own modules, the observers' packed tensors and the callback's shared
    :class:`_Observation` flags only, so that it pickles and deep-copies cheaply with its module.
    """

    def __init__(self, owner: QuantizationAwareTraining, name: str, module: nn.Module, base: type) -> None:
        self.observation = owner._observation
        self.name = name
        self.module = module
        self.base = base  # nn.Linear / nn.Conv*d / Transformers Conv1D: the forward we replace
        self.input_first = base is not None and base is transformers_conv1d_class()  # Conv1D: weight [in, out]
        self.original_class = type(module)
        self.bits = owner.weight_bits
        self.quantize_input = owner.activation_bits is not None
        self.bn: _BatchNorm | None = None
        self.bn_name: str | None = None
        self.check_bn = False  # verify on the next forward that the BN really consumes this conv's output
        self.last_output: torch.Tensor | None = None
        self.bn_hook: Any = None
        self.bn_seen = False  # compiled forwards: the check ran (settled at the next update)
        self.bn_consumed = True  # compiled forwards: every checked BN input was this conv's output
        self.initialized = False  # input range observed at least once
        self.group: _RangeGroup | None = None
        self.slot = 0  # index in the group's packed tensors
        self.qparams: tuple[torch.Tensor, ...] = ()  # (scale, inv_scale, qlo, qhi): views into the group
        # the low-bit modes (weight_group_size, learn_scales, activation_scheme="dynamic", nn.Embedding)
        self.embedding = base is not None and issubclass(base, EMBEDDING_TYPES)  # weight-only: its input is indices
        self.dynamic_input = owner.activation_scheme == "dynamic" and self.quantize_input and not self.embedding
        self.quantize_input = self.quantize_input and not (self.dynamic_input or self.embedding)
        self.group_size: int | None = owner.weight_group_size
        self.scale: nn.Parameter | None = None  # learn_scales: the trainable grid (one per weight, shared when tied)
        self.tied_to: str | None = None  # an earlier layer of this callback holding the same weight (snapped there)
        self.custom_grid = self.group_size is not None or owner.learn_scales

    def bn_factor(self) -> torch.Tensor:
        bn = self.bn
        return bn_fold_factor(_dist.whole(bn.weight), bn.running_var, bn.eps)

    def weight(self, module: nn.Module) -> torch.Tensor:
        """The fake-quantized weight the layer computes with (BN-folded grid when paired).

        In the forward pass FSDP2 has put whole weights in place; outside it (``finalize``) a
        sharded weight is gathered whole here.
        """
        weight = _dist.whole(module.weight)
        if self.custom_grid:
            return self.custom_grid_weight(weight)
        if self.input_first:  # per output channel: the columns of Conv1D's [in, out] weight
            return FQ.fake_quantize_weight(weight.t(), self.bits).t()
        if self.bn is None:
            return FQ.fake_quantize_weight(weight, self.bits)
        return FQ.fold_bn_fake_quantize_weight(weight, self.bn_factor(), self.bits)

    def custom_grid_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """:meth:`weight` on group-wise or learned grids (a learned one with a folded BatchNorm too:
        groups are refused on convs)."""
        if self.bn is not None:
            factor = channel_view(self.bn_factor(), weight.dim())
            return FQ.fake_quantize_weight_learned(weight * factor, self.scale, self.bits) / factor
        return self.quantize_rows(weight, 1 if self.input_first else 0)

    def quantize_rows(self, weight: torch.Tensor, dim: int = 0, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (output channels along ``dim``) fake-quantized on this layer's grid: learned
        (``scale``, default the layer's), per group, or per channel."""
        if self.scale is not None:
            return FQ.fake_quantize_weight_learned(weight, self.scale if scale is None else scale, self.bits, dim)
        if self.group_size is not None:
            return FQ.fake_quantize_weight_groups(weight, self.bits, self.group_size, dim)
        return FQ.fake_quantize_weight(weight.t(), self.bits).t() if dim else FQ.fake_quantize_weight(weight, self.bits)

    def embedding_rows(self, module: nn.Module, indices: torch.Tensor) -> torch.Tensor:
        """The rows ``indices`` look up, fake-quantized: a row's scales depend on that row only, so this
        equals a lookup in the fake-quantized table, at the cost of the rows the batch reads."""
        weight = _dist.whole(module.weight)
        rows = F.embedding(indices, weight, module.padding_idx, None, 2.0, module.scale_grad_by_freq, module.sparse)
        flat = rows.reshape(-1, weight.shape[1])
        scale = None
        if self.scale is not None:  # the looked-up rows' scales ([rows] or [rows, groups])
            scale = F.embedding(indices, self.scale.reshape(weight.shape[0], -1), module.padding_idx)
            scale = scale.reshape(flat.shape[0], *self.scale.shape[1:])
        return self.quantize_rows(flat, 0, scale).reshape(rows.shape)

    def weight_scale(self, module: nn.Module) -> torch.Tensor:
        """The grid ``finalize`` stores (float32, output channels first): the learned scales, else
        ``max |w| / qmax`` per channel (``[out]``) or per group (``[out, in / g]``) of :meth:`grid_weight`."""
        if self.scale is not None:
            return self.scale.detach().float().clamp_min(FQ.WEIGHT_SCALE_EPS)
        grid = self.grid_weight(module)
        if self.group_size is not None:
            return FQ.per_group_weight_scale(grid, self.bits, self.group_size)
        return FQ.per_channel_weight_scale(grid, self.bits)

    def grid_weight(self, module: nn.Module) -> torch.Tensor:
        """The weight whose per-channel grid is quantized, output channels first: ``w`` (Conv1D:
        ``w.t()``), or ``w * bn_factor`` when folded."""
        weight = _dist.whole(module.weight)
        if self.input_first:
            return weight.t()
        if self.bn is None:
            return weight
        return weight * channel_view(self.bn_factor(), weight.dim())

    def set_bn_check(self, on: bool) -> None:
        """Verify (``on``) or stop verifying on the paired BatchNorm's next forward that it consumes this conv's output."""
        if self.bn_hook is not None:
            self.bn_hook.remove()
            self.bn_hook = None
        self.check_bn, self.last_output = on, None
        self.bn_seen, self.bn_consumed = False, True
        if on:
            self.bn_hook = self.bn.register_forward_pre_hook(_BnConsumptionCheck(self))

    def settle_bn_check(self, consumed: bool) -> None:
        """End the pairing check: keep the pair if the BatchNorm ``consumed`` the conv's output, else unpair (warned)."""
        if not consumed:
            warnings.warn(
                f"QuantizationAwareTraining: {self.bn_name!r} does not consume the output of {self.name!r}; "
                "training it without BatchNorm folding",
                stacklevel=3,
            )
            self.bn, self.bn_name = None, None
        self.set_bn_check(False)

    def input(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        """``x`` fake-quantized with the layer's range; observed while the observers run.

        The first input with a finite value starts the range (and is recorded even with frozen
        observers, so that the next update can agree on it over ranks); until then, inputs pass float.
        """
        if not self.quantize_input or x.numel() == 0:
            return FQ.fake_quantize_per_token(x) if self.dynamic_input and x.numel() else x
        flags = self.observation
        observe = training and flags.observing
        if not self.initialized and FQ._compiling():
            return self._input_until_started(x)
        if observe or not self.initialized:
            with torch.no_grad():
                lo, hi = tensor_range(x)
                group = self.group
                if not self.initialized:
                    if not bool(lo <= hi):  # nothing finite to start from (a host sync, until initialized)
                        return x
                    group.initialize(self.slot, lo, hi)
                    self.initialized = True
                    observe = True
                if observe:
                    group.record(self.slot, lo, hi)
                    flags.observed = True
        return FQ.fake_quantize_activation_with_bounds(x, *self.qparams)

    def _input_until_started(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`input` in a compiled graph before the range started: no host sync, nothing to guard on.

        The first input with a finite value starts the range on the group's tensors (a graph cannot
        branch on it); from then on inputs are fake-quantized, before it they pass float (a ``where``,
        for the forwards until the next update, which marks the layer initialized outside the graph).
        """
        with torch.no_grad():
            lo, hi = tensor_range(x)
            started = self.group.start(self.slot, lo, hi)
            self.group.record(self.slot, lo, hi)
            self.observation.observed = True
        return torch.where(started, FQ.fake_quantize_activation_with_bounds(x, *self.qparams), x)


def _qat_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    state = self.__dict__[STATE_ATTR]
    return F.linear(state.input(input, self.training), state.weight(self), self.bias)


def _qat_input_first_linear_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    """Transformers ``Conv1D``: ``x @ weight + bias`` with its ``[in, out]`` weight."""
    state = self.__dict__[STATE_ATTR]
    return F.linear(state.input(input, self.training), state.weight(self).t(), self.bias)


def _qat_conv_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    state = self.__dict__[STATE_ATTR]
    out = self._conv_forward(state.input(input, self.training), state.weight(self), self.bias)
    if state.check_bn:
        state.last_output = out
    return out


def _qat_embedding_forward(self: nn.Embedding, input: torch.Tensor) -> torch.Tensor:
    return self.__dict__[STATE_ATTR].embedding_rows(self, input)


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
    conv1d = transformers_conv1d_class()
    if conv1d is not None and issubclass(cls, conv1d):
        forward = _qat_input_first_linear_forward
    elif issubclass(cls, EMBEDDING_TYPES):
        forward = _qat_embedding_forward
    else:
        forward = _qat_linear_forward if issubclass(cls, nn.Linear) else _qat_conv_forward
    return _subclass(_QAT_CLASSES, cls, "QAT", {"forward": forward})


def _frozen_bn_class(cls: type) -> type:
    return _subclass(_FROZEN_BN_CLASSES, cls, "Frozen", {"train": _frozen_bn_train})


# module-level names so a model pickled mid-training (torch.save(model)) can be loaded back
QATLinear, QATConv1d, QATConv2d, QATConv3d = (_qat_class(c) for c in SUPPORTED_TYPES)
QATEmbedding = _qat_class(nn.Embedding)
FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, FrozenSyncBatchNorm = (
    _frozen_bn_class(c) for c in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
)


@contextlib.contextmanager
def float_forwards(root: nn.Module) -> Iterator[None]:
    """Within the block, ``root``'s ``QAT*`` layers and ``Frozen*`` BatchNorms run their original
    class's forward (float weights, no fake-quant, no observers); their classes come back after.

    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> model[0].__class__ = QATLinear
    >>> with float_forwards(model):
    ...     type(model[0]).__name__
    'Linear'
    >>> type(model[0]).__name__
    'QATLinear'
    """
    ours = set(_QAT_CLASSES.values()) | set(_FROZEN_BN_CLASSES.values())
    swapped = [(m, type(m)) for m in root.modules() if type(m) in ours]
    try:
        for module, cls in swapped:
            module.__class__ = cls._compress_original_class
        yield
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def __getattr__(name: str) -> type:
    """``QATConv1D`` (Transformers' Conv1D, made on first use) by name, so a model pickled mid-training loads back."""
    if name == "QATConv1D":
        from transformers.pytorch_utils import Conv1D

        return _qat_class(Conv1D)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
        self.fresh: list[int] = []  # slots first initialized since the last update (eager forwards)
        # slots whose range started (``settled``: as of the last update); compiled forwards start
        # ranges here, without a host sync, and the next update reads which did
        self.started = torch.zeros(size, dtype=torch.bool, device=device)
        self.settled = torch.zeros(size, dtype=torch.bool, device=device)

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
        self.started[slot] = True
        self.fresh.append(slot)

    def start(self, slot: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """:meth:`initialize` slot ``slot`` at ``[lo, hi]`` if it has not started and the range holds a
        finite value, without a host sync; returns whether it has started (a 1-element tensor)."""
        index = slice(slot, slot + 1)
        started = self.started[index] | (lo <= hi)  # a new tensor: autograd may keep it (a view would change)
        new = started & ~self.started[index]
        self.running_min[index] = torch.where(new, lo, self.running_min[index])
        self.running_max[index] = torch.where(new, hi, self.running_max[index])
        self.set_qparams(index, self.running_min[index], self.running_max[index])
        self.started[index] = started
        return started

    def set_started(self, slot: int, started: bool) -> None:
        """Mark slot ``slot``'s range as started, or not (a resumed state)."""
        self.started[slot] = self.settled[slot] = started

    @torch.no_grad()
    def update(self, averaging_constant: float) -> torch.Tensor:
        """Fold this update's observations into the moving averages; return the slots observed for
        the first time (bool vector).

        Under DDP the observed ranges and the first observations are reduced over ranks first: a
        collective every rank makes, whatever it saw (an empty batch, nothing at all), after which
        every rank holds the same ranges.
        """
        size = self.observed_min.numel()
        first = self.started & ~self.settled
        if _dist.world_size() > 1:
            packed = torch.cat([-self.observed_min, self.observed_max, first.float()])
            _dist.all_reduce_(packed, "max")
            self.observed_min.copy_(-packed[:size])
            self.observed_max.copy_(packed[size : 2 * size])
            first = packed[2 * size :] > 0
        self.fold_moving_average(averaging_constant, first)
        self.refresh_qparams()
        self.fresh.clear()
        self.started |= first
        self.settled |= first
        return first

    def refresh_qparams(self) -> None:
        self.set_qparams(slice(None), self.running_min, self.running_max)


# ---------------------------------------------------------------------------------------- helpers
def _supported_base(module: nn.Module) -> type | None:
    """The Linear/Conv/Conv1D base whose forward ``module`` uses unchanged (None: unsupported)."""
    conv1d = transformers_conv1d_class()
    for base in SUPPORTED_TYPES + EMBEDDING_TYPES + ((conv1d,) if conv1d is not None else ()):
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
