"""What the language-model modes add to QAT's callback: group-size checks, the output head's bit
width, weights tied between layers, and learned (LSQ) weight scales.

:class:`~compress_callbacks.quantization.qat.QuantizationAwareTraining` calls these; the math they
drive lives in :mod:`.grid` (codes) and :mod:`.fake_quant` (autograd).

>>> import torch.nn as nn
>>> check_group_size([("0", nn.Linear(64, 8))], 32)          # 64 input features: 2 groups
>>> check_group_size([("0", nn.Linear(48, 8))], 32)
Traceback (most recent call last):
...
compress_callbacks.config.ArgumentValueError: `weight_group_size` (32) must divide the input features of every quantized layer: '0' has in_features=48
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from .. import _dist
from ..config import ArgumentValueError
from ..targets import is_transformers_conv1d
from . import fake_quant as FQ
from .config import MAX_WEIGHT_BITS
from .qat_layers import CONV_TYPES, EMBEDDING_TYPES

if TYPE_CHECKING:
    from .qat_layers import _LayerState

__all__ = ["input_features", "check_group_size", "check_embeddings", "output_head_name", "head_layers", "LearnedScales"]


def input_features(module: nn.Module) -> int:
    """The length along which ``weight_group_size`` groups a layer's weight: a Linear's
    ``in_features``, a Transformers ``Conv1D``'s ``[in, out]`` first dim, an Embedding's ``embedding_dim``.

    >>> input_features(nn.Linear(64, 8)), input_features(nn.Embedding(100, 16))
    (64, 16)
    """
    weight = module.weight
    return weight.shape[0] if is_transformers_conv1d(module) else weight.shape[-1]


def check_group_size(selected: Sequence[tuple[str, nn.Module]], group_size: int | None) -> None:
    """Raise ``ValueError`` naming the layer if ``group_size`` cannot group it: a Conv, or input
    features it does not divide."""
    if group_size is None:
        return
    for name, module in selected:
        if isinstance(module, CONV_TYPES):
            raise ArgumentValueError(
                "weight_group_size",
                f"`weight_group_size`: {name!r} is a {type(module).__name__}; group-wise scales are supported on "
                f"nn.Linear, Transformers Conv1D and nn.Embedding only: exclude it (`exclude=[{name!r}]`) or use "
                "weight_group_size=None (one scale per output channel)",
            )
        features = input_features(module)
        if features % group_size:
            raise ArgumentValueError(
                "weight_group_size",
                f"`weight_group_size` ({group_size}) must divide the input features of every quantized layer: "
                f"{name!r} has in_features={features}",
            )


def check_embeddings(selected: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse an ``nn.Embedding`` whose ``max_norm`` renormalizes its weight in place while it is read."""
    for name, module in selected:
        if isinstance(module, EMBEDDING_TYPES) and module.max_norm is not None:
            raise ValueError(
                f"`modules`: {name!r} is an nn.Embedding with max_norm={module.max_norm}, which rewrites its weight "
                "on every lookup; QuantizationAwareTraining cannot fake-quantize it: exclude it"
            )


def output_head_name(root: nn.Module) -> str | None:
    """The name of ``root``'s output head (``get_output_embeddings()`` of a Transformers model), if any.

    >>> output_head_name(nn.Linear(2, 2)) is None
    True
    """
    getter = getattr(root, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Module):
        return None
    return next((name for name, module in root.named_modules() if module is head), None)


def head_layers(root: nn.Module, selected: Sequence[tuple[str, nn.Module]], modules: Iterable[Any] | None,
                weight_bits: int) -> list[str]:
    """The selected layers kept at 8-bit weights while ``weight_bits`` < 8: the output head and the
    layers tied to its weight (a tied input embedding), unless one of them is named exactly in ``modules``.

    An LM head at 4 bits carries most of a model's quantization loss; keeping it at higher precision
    unless asked is the common default (llama.cpp's 4-bit mixes keep ``output.weight`` at 6+ bits).
    """
    head = output_head_name(root)
    names = [name for name, _ in selected]
    if weight_bits >= MAX_WEIGHT_BITS or head is None or head not in names:
        return []
    weight = dict(selected)[head].weight
    group = [name for name, module in selected if module.weight is weight]
    explicit = {item for item in modules or () if isinstance(item, str) and not item.startswith("re:")}
    return [] if explicit.intersection(group) else group


class LearnedScales:
    """The trainable weight scales of ``learn_scales=True``, one float32 ``Parameter`` per quantized weight.

    >>> layer = nn.Linear(4, 2)
    >>> class Layer:  # what QuantizationAwareTraining's layers carry (a _LayerState)
    ...     module, bits, group_size, scale, bn, input_first = layer, 4, 2, None, None, False
    ...     def grid_weight(self, module): return module.weight
    >>> scales = LearnedScales()
    >>> scales.create([Layer()])[0].shape   # [out, in / group_size]
    torch.Size([2, 2])

    Shaped ``[out]``, or ``[out, in / g]`` with groups, and shared by layers tied to one weight. They
    are not registered on the model (its ``state_dict`` keys never change): the callback's own
    ``state_dict`` carries them, the optimizer receives them in one of its param groups (see
    :meth:`add_to`), and under DDP their gradients are averaged over ranks before each update.
    """

    def __init__(self) -> None:
        self.parameters: list[nn.Parameter] = []
        self.initialized = False

    def create(self, layers: Sequence[_LayerState]) -> list[nn.Parameter]:
        """A scale per distinct weight of ``layers`` (set on each layer as ``.scale``), filled with ones
        until :meth:`initialize`."""
        by_weight: dict[int, nn.Parameter] = {}
        for st in layers:
            weight = st.module.weight
            if id(weight) not in by_weight:
                out_channels = weight.shape[1 if st.input_first else 0]
                shape = (out_channels,) if st.group_size is None else (out_channels, input_features(st.module) // st.group_size)
                by_weight[id(weight)] = nn.Parameter(torch.ones(shape, dtype=torch.float32, device=weight.device))
            st.scale = by_weight[id(weight)]
        self.parameters = list(by_weight.values())
        return self.parameters

    @torch.no_grad()
    def initialize(self, layers: Sequence[_LayerState]) -> None:
        """Each scale from its weight's current min/max grid (``max |w| / qmax``, per channel or group)."""
        done: set[int] = set()
        for st in layers:
            if id(st.scale) in done:
                continue
            done.add(id(st.scale))
            grid = st.grid_weight(st.module)
            scale = (FQ.per_group_weight_scale(grid, st.bits, st.group_size) if st.group_size is not None
                     else FQ.per_channel_weight_scale(grid, st.bits))
            st.scale.copy_(scale)
        self.initialized = True

    def add_to(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Give the scales to ``optimizer`` (unless it holds them already): they join its first param
        group without weight decay (the Transformers Trainer's bias / norm group), else its first group.

        Joining a group, rather than adding one, keeps every LR scheduler made before ``attach``
        working (a scheduler holds one learning rate per group) and applying to the scales too.
        """
        if optimizer is None or not self.parameters:
            return
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.parameters if id(p) not in owned]
        if missing:
            groups = optimizer.param_groups
            group = next((g for g in groups if not g.get("weight_decay")), groups[0])
            group["params"].extend(missing)

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Under DDP, the mean of every rank's scale gradients (DDP never sees these parameters)."""
        if _dist.world_size() <= 1 or all(p.grad is None for p in self.parameters):
            return  # (no gradient yet, before start_step: the same on every rank)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        _dist.all_reduce_(flat, "sum")
        flat.div_(_dist.world_size())
        offset = 0
        for p, g in zip(self.parameters, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def clear_gradients(self) -> None:
        """Drop the scales' gradients after a real update: a loop that zeroes the model's gradients
        only (the Transformers Trainer calls ``model.zero_grad()``) would otherwise add every step's
        scale gradients up, since the scales are not the model's parameters."""
        for p in self.parameters:
            p.grad = None

    def state(self) -> dict[str, Any]:
        return {"scales": [p.detach().to("cpu").clone() for p in self.parameters], "scales_initialized": self.initialized}

    @torch.no_grad()
    def load(self, state: dict[str, Any]) -> None:
        for p, value in zip(self.parameters, state["scales"]):
            p.copy_(value.to(p.device, p.dtype))
        self.initialized = bool(state["scales_initialized"])
