"""Channel groups from a model's traced data flow: which slices of which weights go together.

``trace_groups(model, example_inputs)`` traces the model with ``torch.export`` and follows every
channel through the ATen graph: each element of each intermediate tensor carries a *label* (the
output channel of the layer that produced it), pushed through reshapes, transposes, flattening
and concatenation by running the same ops on the labels themselves. Where channels meet they are
joined into one *unit*: a residual ``add``, a gating ``mul`` (Llama's ``gate * up``), a BatchNorm or
a bias (which then belong to the channel), a depthwise or grouped convolution, attention (all the
query, key and value channels of one head, and with grouped-query attention a key/value head with
all of its query heads, join one unit). A unit is what can be removed, whole or not at all.

Alongside the labels, two "may be nonzero" bit-maps are propagated: one from the current weights
(what ``shrink`` may remove now without changing any output) and one as if every unit were pruned
(which units pruning *can* make removable: what ``GradualMagnitudePruning(granularity="channel")``
selects among). A unit cannot be removed when its channels are normalised or averaged together with
others (LayerNorm, softmax, ``mean`` over channels), reach the model's output, or enter a layer
carrying a value that is not exactly zero.

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
>>> groups = trace_groups(model, torch.randn(1, 4))
>>> [len(groups.prunable()), len(groups.removable())]  # the 6 hidden channels; the 2 outputs stay
[6, 0]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..quantization.qat_layers import float_forwards
from ..targets import unwrap_model
from ._dataflow import Flow, Interpreter, any_but, components

__all__ = ["Unit", "ChannelGroups", "trace_groups", "trace_call", "split_example_inputs"]

@dataclass(eq=False)
class Unit:
    """One group of channels that is removed whole or not at all.

    >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    >>> unit = trace_groups(model, torch.randn(1, 3)).units[0]
    >>> sorted(unit.slices), unit.columns, unit.producers
    ([('0.bias', 0, 0), ('0.weight', 0, 0)], [('2.weight', 1, 0)], {'0.weight'})

    ``slices``: ``(name, dim, index)`` of every parameter / buffer slice the unit owns (its
    producers' weight rows, their biases, BatchNorm channels, per-channel scales); ``columns``: the
    input columns ``(weight name, dim, index)`` of the layers that consume it; ``producers``: the
    weights whose output channels it holds; ``kind``: ``"channel"`` or ``"head"`` (attention).
    ``problems``: why it cannot be removed at all (empty when it can, given zeros).
    """

    index: int
    kind: str = "channel"
    slices: list[tuple[str, int, int]] = field(default_factory=list)
    columns: list[tuple[str, int, int]] = field(default_factory=list)
    producers: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    zero_now: bool = True  # every consumer sees exactly zero from it with the current weights
    zero_if_pruned: bool = True  # ... once its own slices are zero

    def weight_rows(self) -> list[tuple[str, int, int]]:
        """The producer weight slices the unit owns (what its score is computed over)."""
        return [s for s in self.slices if s[0] in self.producers]


def split_example_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a tensor, a tuple/list of positional inputs or a dict of keyword inputs.

    >>> split_example_inputs(torch.zeros(1))[0][0].shape
    torch.Size([1])
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise TypeError(f"`example_inputs` must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
                    f"got {type(example_inputs).__name__}")


# ------------------------------------------------------------------------------------------ result
@dataclass
class ChannelGroups:
    """The units of a traced model and what decides whether each can be removed (see module doc).

    >>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> groups = trace_groups(model, torch.randn(2, 3))
    >>> with torch.no_grad():
    ...     model[0].weight[1] = 0; model[0].bias[1] = 0
    >>> trace_groups(model, torch.randn(2, 3)).plan(trace_groups(model, torch.randn(2, 3)).removable())
    {'0.bias': {0: tensor([1])}, '0.weight': {0: tensor([1])}, '2.weight': {1: tensor([1])}}
    """

    units: list[Unit]
    unit_of: torch.Tensor  # label id -> unit index
    records: list[tuple[str, torch.Tensor | None, list[torch.Tensor], int | None]]
    shapes: dict[str, tuple[int, ...]]

    def prunable(self, weights: Iterable[str] | None = None) -> list[Unit]:
        """Units that pruning can make removable: all their producers among ``weights`` (default: any),
        nothing mixes them with other channels, and zeroing their own slices zeroes what they carry."""
        allowed = None if weights is None else set(weights)
        found = [u for u in self.units if u.producers and not u.problems and not u.unsupported and u.zero_if_pruned
                 and (allowed is None or u.producers <= allowed)]
        return self._structurally_sound(found, allow_empty=True)

    def removable(self) -> list[Unit]:
        """Units ``shrink`` removes now: they carry exactly zero into every consumer with these weights."""
        found = [u for u in self.units if u.producers and not u.problems and not u.unsupported and u.zero_now]
        return self._structurally_sound(found, allow_empty=False)

    def plan(self, units: Iterable[Unit]) -> dict[str, dict[int, torch.Tensor]]:
        """``{tensor name: {dim: sorted indices to remove}}`` for removing ``units``."""
        out: dict[str, dict[int, set[int]]] = {}
        for unit in units:
            for name, dim, index in unit.slices + unit.columns:
                out.setdefault(name, {}).setdefault(dim, set()).add(index)
        return {name: {dim: torch.tensor(sorted(ix), dtype=torch.int64) for dim, ix in dims.items()} for name, dims in out.items()}

    def _structurally_sound(self, units: list[Unit], allow_empty: bool) -> list[Unit]:
        """Drop units whose removal would not cut whole slices out of every tensor they pass through."""
        chosen = torch.zeros(len(self.units) + 1, dtype=torch.bool)  # last entry: no unit (-1)
        for u in units:
            chosen[u.index] = True
        while True:
            failed = self._failures(chosen, allow_empty)
            if not failed:
                break
            for index in failed:
                chosen[index] = False
                self.units[index].problems.append("its channels are not whole slices of a tensor they pass through")
        return [u for u in units if chosen[u.index]]

    def _removed(self, labels: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        units = torch.where(labels >= 0, self.unit_of[labels.clamp_min(0)], -1)
        return chosen[units]

    def _failures(self, chosen: torch.Tensor, allow_empty: bool) -> set[int]:
        failed: set[int] = set()
        for _, labels, operands, channel_dim in self.records:
            if labels is None:  # a layer's input: channels are removed along its channel dim only
                removed = self._removed(operands[0], chosen)
                if removed.any() and not _whole_slices(removed, channel_dim):
                    failed |= self._units_in(operands[0], removed)
                continue
            removed = self._removed(labels, chosen)
            if not removed.any():
                continue
            dim = _removal_dim(removed)
            if dim is None or (not allow_empty and bool(removed.all())):
                failed |= self._units_in(labels, removed)
                continue
            for operand in operands:
                offset = labels.ndim - operand.ndim
                if dim - offset < 0 or operand.shape[dim - offset] == 1:  # broadcast along the removed dim
                    continue
                if not torch.equal(self._removed(torch.broadcast_to(operand, labels.shape), chosen), removed):
                    failed |= self._units_in(labels, removed)
                    break
        return failed

    def _units_in(self, labels: torch.Tensor, removed: torch.Tensor) -> set[int]:
        return {int(u) for u in torch.unique(self.unit_of[labels[removed]])}


def _whole_slices(removed: torch.Tensor, dim: int) -> bool:
    """Whether ``removed`` marks whole slices along ``dim``."""
    along = any_but(removed, dim)
    shape = [1] * removed.ndim
    shape[dim] = -1
    return torch.equal(along.view(shape).expand(removed.shape), removed)


def _removal_dim(removed: torch.Tensor) -> int | None:
    """The dim along which ``removed`` marks whole slices (one longer than 1 first; None if none)."""
    valid = [d for d in range(removed.ndim) if _whole_slices(removed, d)]
    longer = [d for d in valid if removed.shape[d] > 1]
    return (longer or valid or [None])[0]


def _build(flow: Flow) -> ChannelGroups:
    root = components(flow.next_id, flow.edges)
    roots, unit_of = torch.unique(root, return_inverse=True)
    units = [Unit(index=i) for i in range(roots.numel())]
    for base, name, dim in flow.range_info:
        size = flow.tensors[name].shape[dim]
        for index, u in enumerate(unit_of[base:base + size].tolist()):
            units[u].slices.append((name, dim, index))
            if (name, dim) in flow.producer_ranges:
                units[u].producers.add(name)
    for weight, dim, labels, index, ok_now, ok_pruned in flow.columns:
        present = labels >= 0
        for label, column, now, pruned in zip(labels[present].tolist(), index[present].tolist(),
                                               ok_now[present].tolist(), ok_pruned[present].tolist()):
            unit = units[int(unit_of[label])]
            if (weight, dim, column) not in unit.columns:
                unit.columns.append((weight, dim, column))
            unit.zero_now &= now
            unit.zero_if_pruned &= pruned
    for labels, now, pruned in flow.zero_checks:
        present = labels >= 0
        for label, n, p in zip(labels[present].tolist(), now[present].tolist(), pruned[present].tolist()):
            unit = units[int(unit_of[label])]
            unit.zero_now &= not n
            unit.zero_if_pruned &= not p
    for rows, what in flow.mixing:
        for row in rows:
            found = torch.unique(unit_of[row[row >= 0]])
            if found.numel() > 1 or bool((row < 0).any()):
                for u in found.tolist():
                    _note(units[u].problems, f"normalised or reduced together with other channels by {what}")
    for labels, why in flow.blocked:
        for u in torch.unique(unit_of[labels[labels >= 0]]).tolist():
            _note(units[u].problems, why)
    for labels, what in flow.unsupported:
        for u in torch.unique(unit_of[labels[labels >= 0]]).tolist():
            _note(units[u].unsupported, what)
    for reps in flow.heads:
        for u in torch.unique(unit_of[reps[reps >= 0]]).tolist():
            units[u].kind = "head"
    shapes = {name: tuple(t.shape) for name, t in flow.tensors.items()}
    return ChannelGroups(units=units, unit_of=torch.cat([unit_of, torch.tensor([len(units)])]),
                         records=flow.records, shapes=shapes)


def _note(notes: list[str], text: str) -> None:
    if text not in notes:
        notes.append(text)


def _export(model: nn.Module, args: tuple, kwargs: dict):
    """``torch.export`` of ``model`` in eval mode (Transformers: without a KV cache); modes restored."""
    modes = {m: m.training for m in model.modules()}
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache:
        config.use_cache = False
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:  # noqa: BLE001 - any tracing failure is reported the same way
        raise ValueError(f"`example_inputs`: could not trace {type(model).__name__} with torch.export "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    finally:
        for module, mode in modes.items():
            module.training = mode
        if use_cache:
            config.use_cache = use_cache


def trace_groups(model: nn.Module, example_inputs: Any) -> ChannelGroups:
    """Trace ``model`` on ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of
    keyword inputs) and find its units (see the module docstring). The model is not changed."""
    args, kwargs = split_example_inputs(example_inputs)
    return trace_call(model, args, kwargs)


@torch.no_grad()
def trace_call(model: nn.Module, args: tuple, kwargs: dict) -> ChannelGroups:
    """:func:`trace_groups` on the call ``model(*args, **kwargs)``."""
    root = unwrap_model(model)
    with float_forwards(root):  # the channels of the float model: QAT's fake-quant and BN fold hide its weights
        ep = _export(root, args, kwargs)
    # the graph is interpreted on CPU (labels and bit-maps live there): weights on an accelerator are copied
    tensors = {name: t.detach().cpu() for name, t in root.named_parameters(remove_duplicate=False)}
    tensors.update({name: t.detach().cpu() for name, t in root.named_buffers(remove_duplicate=False)})
    tensors.update({name: t.detach().cpu() for name, t in ep.constants.items() if isinstance(t, torch.Tensor)})
    names = {spec.arg.name: spec.target for spec in ep.graph_signature.input_specs
             if spec.target is not None and spec.target in tensors}
    flow = Flow(tensors)
    modes = {m: m.training for m in root.modules()}
    root.eval()
    try:
        user = [t.detach().cpu() if isinstance(t, torch.Tensor) else t for t in pytree.tree_leaves((args, kwargs))]
        Interpreter(ep, flow, names, user).run()
    finally:
        for module, mode in modes.items():
            module.training = mode
    return _build(flow)
