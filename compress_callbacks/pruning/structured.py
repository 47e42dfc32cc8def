"""Group-aware channel and head selection for ``GradualMagnitudePruning``.

``GroupSelection`` learns the model's channel groups (:mod:`.groups`) from the first batch the model
sees: a forward pre-hook keeps that call's inputs (cut to one example) and removes itself; the
model is traced once, at the first mask update that needs it. Each prunable unit gets one score,
the L2 norm over every weight row it owns, and is pruned whole: its weight rows, and the biases and
BatchNorm channels that belong to it, which are not targeted weights and so are masked beside them
(:attr:`owned_names`). With ``granularity="channel"``, targeted layers whose channels cannot be
removed (a classifier's outputs, channels normalised together by a LayerNorm) keep per-row
selection, and a warning names them; with ``"head"`` only attention heads are pruned.

Under FSDP2 (``fully_shard``: every rank holds a block of rows of each parameter) the first rank
traces the model once, with its parameters gathered whole (:func:`.sharded.on_whole_model`), and
sends the units to the others; each rank then scores and masks its own block of rows.

>>> import torch, torch.nn as nn
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> selection = GroupSelection(model, ["0.weight"], "channel")
>>> _ = model(torch.randn(3, 4))                       # the first batch is kept for tracing
>>> keeps, owned = selection.select([model[0].weight], [None], {}, 0.5, "layer")
>>> int((keeps[0].amax(1) == 0).sum()), sorted(owned), int((owned["0.bias"] == 0).sum())
(4, ['0.bias'], 4)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .. import _dist as D
from . import masks as M
from .groups import trace_call
from .sharded import on_whole_model, row_range

__all__ = ["GroupSelection", "first_example"]


def first_example(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's inputs cut to their first example when every tensor shares its first dim (a batch).

    >>> first_example((torch.zeros(4, 3),), {"mask": torch.ones(4, 2)})[1]["mask"].shape
    torch.Size([1, 2])
    """
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    sizes = {t.shape[0] if t.ndim else None for t in leaves}
    detach = (lambda t: t.detach()[:1]) if len(sizes) == 1 and None not in sizes else (lambda t: t.detach())
    return pytree.tree_map(lambda t: detach(t) if isinstance(t, torch.Tensor) else t, (args, kwargs))


class _Rows:
    """Slices of one tensor owned by units: along ``dim``, ``index[i]`` belongs to unit ``unit[i]``."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[list[int], list[int]]] = {}

    def add(self, dim: int, index: int, unit: int) -> None:
        indices, units = self.entries.setdefault(dim, ([], []))
        indices.append(index)
        units.append(unit)

    def tensors(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        return {d: (torch.tensor(i, dtype=torch.int64), torch.tensor(u, dtype=torch.int64)) for d, (i, u) in self.entries.items()}


class GroupSelection:
    """Channel groups of one model and the masks that prune whole units (see the module docstring).

    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 3))
    >>> selection = GroupSelection(model, ["0.weight"], "channel")
    >>> _ = model(torch.randn(2, 1, 6, 6))
    >>> keeps, owned = selection.select([model[0].weight], [None], {}, 0.5, "layer")
    >>> sorted(owned), int((owned["1.weight"] == 0).sum())    # the BatchNorm channels go with the rows
    (['0.bias', '1.bias', '1.weight'], 2)

    ``names``: the targeted weights, in the order the pruning callback keeps them; ``out_dims``: the
    dim of each that indexes output channels (default 0; 1 for ConvTranspose and Conv1D), used where
    a layer keeps per-row selection. ``select`` returns new keep masks for those weights and for the
    other parameters the pruned units own.
    """

    def __init__(self, root: nn.Module, names: Sequence[str], granularity: str, out_dims: Sequence[int] | None = None) -> None:
        self.root, self.names, self.granularity = root, list(names), granularity
        self.out_dims = dict(zip(self.names, out_dims if out_dims is not None else [0] * len(self.names)))
        self.inputs: tuple[tuple, dict] | None = None
        self.on_inputs: Callable[[], None] | None = None  # a selection waiting for the first batch
        self.owned_names: list[str] = []
        self._rows: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._families: torch.Tensor | None = None
        # FSDP2: ahead of its hooks, so the first selection masks the sharded weights before they are
        # gathered for that forward pass, and the inputs are the user's (not cast for mixed precision)
        sharded = any(D.is_sharded(p) for p in root.parameters())
        self._hook = root.register_forward_pre_hook(self._capture, with_kwargs=True, prepend=sharded)

    @property
    def ready(self) -> bool:
        """Whether inputs are known (or the groups already traced)."""
        return self.inputs is not None or self._rows is not None

    def close(self) -> None:
        """Remove the input hook (if it has not fired) and drop the kept inputs."""
        self._hook.remove()
        self.inputs, self.on_inputs = None, None

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._hook.remove()
        self.inputs = first_example(args, kwargs)
        if self.on_inputs is not None:
            pending, self.on_inputs = self.on_inputs, None
            device = next(iter(self.root.parameters())).device.type
            with torch.autocast(device_type=device, enabled=False):  # the trace and the masks in full precision
                pending()

    # ---------------------------------------------------------------- groups
    def _trace(self) -> None:
        """Find the units on the first batch (under FSDP2: on the first rank, on the whole model)."""
        args, kwargs = self.inputs
        self.inputs = None
        self._rows, self._families, self.owned_names = on_whole_model(self.root, lambda: self._units(args, kwargs))

    def _units(self, args: tuple, kwargs: dict):
        """``(rows, families, owned names)`` of the units traced on ``model(*args, **kwargs)``."""
        params = dict(self.root.named_parameters())
        try:
            groups = trace_call(self.root, args, kwargs)
        except ValueError as err:  # the model cannot be traced: no groups
            if self.granularity == "head":
                raise ValueError(f"GradualMagnitudePruning(granularity='head') needs the model's attention heads, "
                                 f"found by tracing it on its first batch, which failed: {err}") from err
            warnings.warn(f"GradualMagnitudePruning(granularity='channel'): the model could not be traced ({err}); "
                          "every layer keeps per-row channel selection, and shrink() may leave them as they are", stacklevel=7)
            return self._index([[(n, self.out_dims[n], i)] for n in self.names for i in range(params[n].shape[self.out_dims[n]])],
                               [frozenset([n]) for n in self.names for _ in range(params[n].shape[self.out_dims[n]])])
        kind = "head" if self.granularity == "head" else "channel"
        candidates = groups.prunable(self.names)
        units = [u for u in candidates if u.kind == kind]
        covered = {(name, dim, index) for u in units for name, dim, index in u.weight_rows()}
        left = [n for n in self.names if not any(c[0] == n for c in covered)]
        slices = [[s for s in u.slices if s[0] in params] for u in units]
        families = [frozenset(u.producers) for u in units]
        if self.granularity == "channel":
            in_heads = {n for u in candidates if u.kind == "head" for n in u.producers}
            projections = [n for n in left if n in in_heads]
            if projections:  # their rows go by whole heads: zeroing single rows would leave them unremovable
                warnings.warn(f"GradualMagnitudePruning(granularity='channel'): {', '.join(n.rsplit('.', 1)[0] for n in projections[:8])}"
                              f"{'...' if len(projections) > 8 else ''} project attention heads and stay dense; prune their "
                              "heads with granularity='head'", stacklevel=7)
            left = [n for n in left if n not in in_heads]
            for name in left:  # per-row selection where no group can be removed whole
                for index in range(params[name].shape[self.out_dims[name]]):
                    slices.append([(name, self.out_dims[name], index)])
                    families.append(frozenset([name]))
        if left:
            reasons = {self._reason(groups, n, self.granularity) for n in left}
            action = "keep per-row channel selection: shrink() will leave them as they are" if self.granularity == "channel" \
                else "have no attention heads and stay dense"
            warnings.warn(f"GradualMagnitudePruning(granularity={self.granularity!r}): {', '.join(n.rsplit('.', 1)[0] for n in left[:8])}"
                          f"{'...' if len(left) > 8 else ''} {action} ({'; '.join(sorted(reasons))[:300]})", stacklevel=7)
        return self._index(slices, families)

    def _index(self, slices: list[list[tuple[str, int, int]]], families: list[frozenset]):
        """The units' slices indexed by tensor, their families numbered, and the owned tensors' names."""
        rows: dict[str, _Rows] = {}
        for unit_index, unit_slices in enumerate(slices):
            for name, dim, index in unit_slices:
                rows.setdefault(name, _Rows()).add(dim, index, unit_index)
        indexed = {name: r.tensors() for name, r in rows.items()}
        family_ids = {f: i for i, f in enumerate(dict.fromkeys(families))}
        numbered = torch.tensor([family_ids[f] for f in families], dtype=torch.int64)
        return indexed, numbered, [n for n in indexed if n not in self.names]

    @staticmethod
    def _reason(groups, name: str, granularity: str) -> str:
        """Why no unit of ``name`` can be pruned whole (the first reason found)."""
        if granularity == "head":
            return "not part of any attention head"
        for unit in groups.units:
            if name in unit.producers and (unit.problems or unit.unsupported):
                return (unit.problems + unit.unsupported)[0]
        return "its channels are not exactly zero once pruned"

    # ---------------------------------------------------------------- selection
    @torch.no_grad()
    def select(self, weights: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor | None],
               owned_keeps: dict[str, torch.Tensor | None], target: float, scope: str,
               params: Mapping[str, torch.Tensor] | None = None):
        """New keep masks ``(for the targeted weights, {owned name: mask})`` at sparsity ``target``.

        ``params``: the model's parameters by name (default ``root.named_parameters()``), where the
        owned ones are found. Under FSDP2 (``weights`` are DTensors sharded along dim 0) ``keeps``,
        ``owned_keeps`` and the result are this rank's blocks: each rank sums its rows' squares into
        whole-length vectors, one all-reduce adds them up, every rank chooses the same units (rank 0's
        choice is broadcast) and keeps the rows of its block: the blocks of a single process's masks.
        """
        if self._rows is None:
            self._trace()
        sharded = next((w for w in weights if D.is_sharded(w)), None)
        n_units = self._families.numel()
        sizes = torch.zeros(n_units, dtype=torch.int64)
        per_row = []  # (name, dim, whole-length [squares, live] of each slice along dim)
        for name, weight, keep in zip(self.names, weights, keeps):
            block, (start, stop) = D.local(weight.detach()), row_range(weight)
            for dim, (index, unit) in self._rows.get(name, {}).items():
                length = weight.shape[dim]
                sizes.index_add_(0, unit, torch.full_like(unit, weight.numel() // max(length, 1)))
                found = torch.zeros(2, length, dtype=torch.float64)
                at = slice(start, stop) if dim == 0 else slice(0, length)  # along dim 0 a block holds rows start..stop
                found[0, at] = block.to(torch.float64).pow(2).movedim(dim, 0).reshape(block.shape[dim], -1).sum(1).cpu()
                found[1, at] = 1.0 if keep is None else keep.movedim(dim, 0).reshape(block.shape[dim], -1).amax(1).cpu().double()
                per_row.append((index, unit, found))
        if sharded is not None and per_row:  # zeros elsewhere: the sums are each rank's exact rows
            summed = D.sum_over_shards(torch.cat([found for _, _, found in per_row], 1), sharded)
            per_row = [(index, unit, part) for (index, unit, _), part in
                       zip(per_row, summed.split([found.shape[1] for _, _, found in per_row], 1))]
        squares = torch.zeros(n_units, dtype=torch.float64)
        alive = torch.zeros(n_units, dtype=torch.int64)
        for index, unit, found in per_row:
            squares.index_add_(0, unit, found[0, index])
            alive.index_add_(0, unit, (found[1, index] > 0).to(torch.int64))
        scores = squares.sqrt()
        if scope == "global":
            scores = scores / sizes.clamp_min(1).to(torch.float64).sqrt()
        total = sum(w.numel() for w in weights)
        chosen = M.units_to_prune(scores.to(torch.float32), sizes, alive == 0, self._families, target, scope, total)
        if sharded is not None:  # every rank keeps its block of one choice
            chosen = D.broadcast_(chosen)
        new_keeps = [self._masked(name, w, keep, chosen) for name, w, keep in zip(self.names, weights, keeps)]
        params = dict(self.root.named_parameters()) if params is None else params
        owned = {name: self._masked(name, params[name], owned_keeps.get(name), chosen) for name in self.owned_names}
        return new_keeps, owned

    def _masked(self, name: str, tensor: torch.Tensor, keep: torch.Tensor | None, chosen: torch.Tensor) -> torch.Tensor | None:
        """``keep`` (this rank's block of ``tensor``'s mask) with the slices of the ``chosen`` units zeroed."""
        rows = self._rows.get(name)
        if not rows:
            return keep
        block, (start, stop) = D.local(tensor.detach()), row_range(tensor)
        out = torch.ones(block.shape, dtype=torch.uint8, device=block.device) if keep is None else keep.clone()
        for dim, (index, unit) in rows.items():
            gone = index[chosen[unit]]
            if dim == 0:  # the rows of this rank's block, numbered from its first
                gone = gone[(gone >= start) & (gone < stop)] - start
            if gone.numel():
                out.index_fill_(dim, gone.to(out.device), 0)
        return out
