"""Mask selection on weights whose rows are split into blocks across ranks (FSDP2's ``fully_shard``).

Each rank holds one block of rows of every weight; :func:`sharded_keep_masks` gives each rank its
block of exactly the masks :func:`~compress_callbacks.pruning.masks.unstructured_keep_masks` (or
``nm_keep_masks``) computes on the whole weights, moving only histograms and a few counts.
:func:`row_range` says which rows a rank holds, and :func:`on_whole_model` runs a function once on
the first rank while the model is a plain, unsharded module there (tracing the channel groups).
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import _dist as D

from .masks import (
    _apply_selection,
    _guard,
    _largest_kept,
    _LazyKeys,
    _materialize,
    _NativeMagnitudeKeys,
    _nm_keys,
    _take_below,
    _unguard_,
    count_to_prune,
    kth_smallest_key,
    magnitude_key_source,
)

__all__ = ["sharded_keep_masks", "row_range", "on_whole_model"]

T = TypeVar("T")


def sharded_keep_masks(
    blocks: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor | None],
    numels: Sequence[int],
    target: float,
    scope: str,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor],
    gather_over_ranks: Callable[[torch.Tensor], torch.Tensor],
    rank: int,
    nm: tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """:func:`unstructured_keep_masks` (or, with ``nm``, :func:`nm_keep_masks`) for weights whose
    rows are split into blocks across ranks.

    ``blocks`` / ``keeps``: this rank's block of each weight (blocks in rank order make up the
    weight, as FSDP2's dim-0 sharding lays them out); ``numels``: the whole weights' sizes;
    ``sum_over_ranks`` sums a tensor over ranks in place; ``gather_over_ranks`` stacks one tensor
    per rank (rank order); ``rank``: this rank's index in that order. Only histograms and per-layer
    tie counts travel, never weights: the radix select runs on each rank's blocks with summed
    histograms, and the ties at the threshold go in layer order, then rank order, then flat index,
    which is the flat order of the whole weights. The result is this rank's block of exactly the
    masks a single process computes on the whole weights.
    """
    keeps = list(keeps)
    groups = [list(range(len(blocks)))] if scope == "global" else [[i] for i in range(len(blocks))]
    out: list[torch.Tensor | None] = [None] * len(blocks)
    for group in groups:
        kept = torch.tensor([int(keeps[i].sum(dtype=torch.int64)) if keeps[i] is not None else blocks[i].numel()
                             for i in group], dtype=torch.int64)
        pruned_now = sum(numels[i] for i in group) - int(sum_over_ranks(kept).sum())
        guarded, largest, keep_at_least = [keeps[i] for i in group], [-1] * len(group), 0
        if nm is None and scope == "global":  # each layer's largest kept weight, wherever it lies, stays
            largest, keep_at_least = _largest_kept_over_ranks([blocks[i] for i in group], guarded, gather_over_ranks, rank)
            guarded = [_guard(blocks[i], keeps[i], index) for i, index in zip(group, largest)]
        elif nm is None:
            keep_at_least = 1
        k = count_to_prune(sum(numels[i] for i in group), target, keep_at_least) - pruned_now
        sources = [magnitude_key_source(blocks[i], keep) if nm is None else _LazyKeys(_nm_keys, blocks[i], keep, *nm)
                   for i, keep in zip(group, guarded)]
        if k <= 0:
            for i in group:
                out[i] = torch.ones(blocks[i].shape, dtype=torch.uint8, device=blocks[i].device) if keeps[i] is None else keeps[i].clone()
            continue
        threshold, below = kth_smallest_key(sources, k, sum_over_ranks)
        equal = torch.tensor([int((_materialize(src) == threshold).sum()) for src in sources], dtype=torch.int64)
        table = gather_over_ranks(equal)  # [ranks, layers of the group]
        ties_left = k - below
        allowance = torch.zeros_like(table)
        for layer in range(table.shape[1]):  # layer order, then rank order: the whole weights' flat order
            for r in range(table.shape[0]):
                take = min(ties_left, int(table[r, layer]))
                allowance[r, layer] = take
                ties_left -= take
        for column, (i, src) in enumerate(zip(group, sources)):
            ties = int(allowance[rank, column])
            if isinstance(src, _NativeMagnitudeKeys):
                out[i], _ = src.prune_below(src.weight, src.keep, threshold, ties)
            else:
                chosen, _ = _take_below(_materialize(src), threshold, ties)
                out[i] = _apply_selection([keeps[i]], [blocks[i].shape], [chosen])[0]
            _unguard_([out[i]], [largest[column]])
    return out  # type: ignore[return-value]


def _largest_kept_over_ranks(
    blocks: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor | None],
    gather_over_ranks: Callable[[torch.Tensor], torch.Tensor], rank: int,
) -> tuple[list[int], int]:
    """Each layer's largest kept weight over all ranks' blocks (the first of equals in the whole
    weights' order: lowest rank, then flat index): its flat index in this rank's block (-1 where
    another rank holds it, or the layer keeps nothing), and how many layers keep a weight."""
    found = [_largest_kept(block, keep) for block, keep in zip(blocks, keeps)]
    table = gather_over_ranks(torch.tensor([value for value, _ in found], dtype=torch.float32))  # [ranks, layers]
    best, holder = table.amax(dim=0), table.argmax(dim=0)  # argmax: the first rank with the largest value
    indices = [index if int(holder[layer]) == rank and float(best[layer]) >= 0 else -1
               for layer, (_, index) in enumerate(found)]
    return indices, int((best >= 0).sum())


# ------------------------------------------------------------------ blocks of rows, whole model
def row_range(tensor: torch.Tensor) -> tuple[int, int]:
    """This rank's rows ``[start, stop)`` of ``tensor`` along dim 0: FSDP2's ``Shard(0)`` layout
    (``torch.chunk``: blocks of ``ceil(rows / ranks)`` in rank order, the last ones shorter or
    empty); all rows for a plain tensor.

    >>> row_range(torch.zeros(5, 3))
    (0, 5)
    """
    rows = tensor.shape[0] if tensor.ndim else 1
    if not D.is_sharded(tensor):
        return 0, rows
    mesh = tensor.device_mesh
    block = -(-rows // mesh.size())
    start = min(mesh.get_local_rank() * block, rows)
    stop = min(start + block, rows)
    held = D.local(tensor).shape[0] if tensor.ndim else 1
    if stop - start != held:
        raise ValueError(f"a sharded tensor of {rows} rows holds {held} on this rank, not FSDP2's block "
                         f"[{start}, {stop}): only `fully_shard`'s dim-0 layout is supported")
    return start, stop


def on_whole_model(root: nn.Module, fn: Callable[[], T]) -> T:
    """``fn()`` run once, on the first rank of the mesh that shards ``root``'s parameters, while
    ``root`` is a plain module there: each sharded parameter replaced by its whole tensor and FSDP2's
    forward hooks set aside (so that a forward pass runs no collective); everything is put back
    afterwards. Its result, which must pickle, or its exception reaches every rank. Every rank must
    call this (the parameters are gathered over the ranks). Memory: the first rank holds one whole
    copy of the parameters while ``fn`` runs; the others one whole parameter at a time.
    """
    sharded = [p for p in root.parameters() if D.is_sharded(p)]
    if not sharded:
        return fn()
    mesh = sharded[0].device_mesh
    first = mesh.get_local_rank() == 0
    whole: dict[int, nn.Parameter] = {}
    for param in sharded:  # the same order on every rank: one all-gather each
        full = param.detach().full_tensor()
        if first:
            whole[id(param)] = nn.Parameter(full, requires_grad=param.requires_grad)
    outcome: list = [None]
    failure: BaseException | None = None
    if first:
        try:
            with _plain_modules(root, whole):
                outcome = [(fn(), None)]
        except Exception as err:  # noqa: BLE001 - every rank raises it
            failure = err
            outcome = [(None, err if _pickles(err) else RuntimeError(f"{type(err).__name__}: {err}"))]
        whole.clear()
    group = mesh.get_group()
    dist.broadcast_object_list(outcome, src=dist.get_global_rank(group, 0), group=group)
    result, error = outcome[0]
    if failure is not None:
        raise failure
    if error is not None:
        raise error
    return result


def _pickles(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:  # noqa: BLE001 - any pickling failure
        return False
    return True


def _bound_to(hook: Callable, owner: object) -> bool:
    """Whether ``hook``, or a function it wraps (``functools.wraps``), is a method bound to ``owner``."""
    seen = 0
    while hook is not None and seen < 16:
        if getattr(hook, "__self__", None) is owner:
            return True
        hook, seen = getattr(hook, "__wrapped__", None), seen + 1
    return False


@contextmanager
def _plain_modules(root: nn.Module, whole: dict[int, nn.Parameter]) -> Iterator[None]:
    """``root`` with the parameters keyed (by id) in ``whole`` swapped for those and FSDP2's forward
    hooks set aside; restored on exit."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    hooks: list[tuple[nn.Module, str, OrderedDict]] = []
    try:
        for module in root.modules():
            if isinstance(module, FSDPModule):
                state = fully_shard.state(module)
                for attribute in ("_forward_pre_hooks", "_forward_hooks"):
                    found = getattr(module, attribute)
                    own = {key for key, hook in found.items() if _bound_to(hook, state)}
                    if not own:
                        raise RuntimeError(f"could not find FSDP2's forward hooks on {type(module).__name__} in this "
                                           f"torch {torch.__version__}: the model cannot be traced unsharded")
                    hooks.append((module, attribute, found))
                    setattr(module, attribute, OrderedDict((k, h) for k, h in found.items() if k not in own))
            for name, param in list(module._parameters.items()):
                if param is not None and id(param) in whole:
                    swapped.append((module, name, param))
                    module._parameters[name] = whole[id(param)]
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
        for module, attribute, found in hooks:
            setattr(module, attribute, found)
