"""Pure mask math: exact, deterministic, monotone magnitude selection without concatenation.

Masks are ``uint8`` "keep" tensors (1 = kept, 0 = pruned): one byte per weight, and
``grad.mul_(keep)`` is a vectorised pass (``masked_fill_`` with a bool mask is ~10x slower on CPU).

Selection is exact: the ``k`` smallest scores are pruned, ties broken by flat index (then by layer
order for global selection), so every rank and every rerun picks the same weights. Already-pruned
weights stay pruned. No layer is ever pruned away: each keeps at least its largest weight
(unstructured), its strongest output channel (channel) or the N largest of each group (N:M), in
either scope, even where the target would round to the whole layer. The k-th smallest score is found by a radix select on the float bit patterns
(non-negative float32 values order like their int32 bits), one layer at a time, so a global
selection needs no concatenated copy of all weights.

>>> import torch
>>> w = torch.tensor([[0.5, -0.1, 0.3, 0.0], [0.2, -0.7, 0.05, 0.9]])
>>> keep = unstructured_keep_masks([w], 0.5)[0]
>>> keep.tolist()
[[1, 0, 1, 0], [0, 1, 0, 1]]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = [
    "PRUNED_KEY",
    "count_to_prune",
    "magnitude_keys",
    "kth_smallest_key",
    "select_smallest",
    "unstructured_keep_masks",
    "channel_keep_masks",
    "units_to_prune",
    "nm_keep_masks",
    "parse_nm",
    "keep_from_zeros",
    "sparsity",
    "MASK_SCRATCH_ELEMENTS",
    "apply_keep_",
]

#: key given to weights that are already pruned: larger than any float32 bit pattern, never selected again.
PRUNED_KEY = torch.iinfo(torch.int32).max
_CHUNK = 1 << 18  # elements per histogram chunk (bounds temporaries)

#: elements of the float scratch buffer ``apply_keep_`` converts uint8 masks into (2 MiB in float32).
MASK_SCRATCH_ELEMENTS = 1 << 19


def count_to_prune(numel: int, target: float, keep_at_least: int = 0) -> int:
    """Number of weights to prune so that sparsity is ``target`` (nearest integer), leaving at least
    ``keep_at_least`` of them.

    >>> count_to_prune(10, 0.2), count_to_prune(4, 0.9), count_to_prune(4, 0.9, keep_at_least=1)
    (2, 4, 3)
    """
    return max(min(numel - keep_at_least, int(math.floor(target * numel + 0.5))), 0)


def channels_first(tensor: torch.Tensor, out_dim: int = 0) -> torch.Tensor:
    """``tensor`` (shaped like a weight) as ``[out_channels, inputs per output]``, the output channels
    indexing ``out_dim`` (0 for Linear/Conv, 1 for Transformers Conv1D and ConvTranspose): a view
    for ``out_dim=0``, else a copy.

    >>> channels_first(torch.arange(6).reshape(3, 2), out_dim=1).tolist()   # a [in=3, out=2] weight
    [[0, 2, 4], [1, 3, 5]]
    """
    rows = tensor.shape[out_dim]
    inputs = math.prod(size for dim, size in enumerate(tensor.shape) if dim != out_dim)
    return tensor.movedim(out_dim, 0).reshape(rows, inputs)  # explicit sizes: an empty block reshapes too


def sparsity(keep: torch.Tensor | None, numel: int | None = None) -> float:
    """Fraction of zeros in a keep mask (0.0 for ``None``)."""
    if keep is None:
        return 0.0
    n = keep.numel() if numel is None else numel
    return 1.0 - int(keep.sum(dtype=torch.int64)) / n


def magnitude_keys(scores: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """int32 sort keys of non-negative float ``scores`` (a fresh tensor); pruned entries get PRUNED_KEY.

    >>> magnitude_keys(torch.tensor([0.0, 1.0]), torch.tensor([1, 0], dtype=torch.uint8)).tolist()
    [0, 2147483647]
    """
    keys = scores.detach().to(torch.float32, copy=True).abs_().view(torch.int32)
    if keep is not None:
        keys.masked_fill_(keep == 0, PRUNED_KEY)
    return keys


Keys = Sequence[torch.Tensor | Callable[[], torch.Tensor]]


def _materialize(keys: torch.Tensor | Callable[[], torch.Tensor]) -> torch.Tensor:
    """A layer's keys: the tensor itself, or built now by its callable (and dropped after use)."""
    return keys() if callable(keys) else keys


class _LazyKeys:
    """A callable that builds one layer's keys from its weight when asked (``numel`` known up front)."""

    def __init__(self, build: Callable[..., torch.Tensor], *args: Any) -> None:
        self.build, self.args = build, args
        self.numel = args[0].numel()

    def __call__(self) -> torch.Tensor:
        return self.build(*self.args)


def native_layout(tensor: torch.Tensor, keep: torch.Tensor | None) -> bool:
    """What the native kernels take: a contiguous float32 CPU ``tensor`` and a contiguous uint8 CPU
    ``keep`` of as many elements (or None)."""
    return (tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous()
            and (keep is None or (keep.dtype == torch.uint8 and keep.device.type == "cpu" and keep.is_contiguous()
                                  and keep.numel() == tensor.numel())))


class _NativeMagnitudeKeys:
    """One layer's magnitude keys, never built: native kernels read ``|w|`` and ``keep`` directly."""

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor | None, kernels) -> None:
        self.weight, self.keep = weight.detach(), keep
        self.histogram, self.prune_below = kernels
        self.numel = weight.numel()

    def __call__(self) -> torch.Tensor:  # the generic path, should anything ask for the tensor
        return magnitude_keys(self.weight, self.keep)


def magnitude_key_source(weight: torch.Tensor, keep: torch.Tensor | None, lazy: bool = True):
    """Native key source for ``weight`` where the kernels apply, else its keys (``lazy``: built when asked)."""
    from .._native import magnitude_select_kernels

    kernels = magnitude_select_kernels() if native_layout(weight, keep) else None
    if kernels is not None:
        return _NativeMagnitudeKeys(weight, keep, kernels)
    return _LazyKeys(magnitude_keys, weight, keep) if lazy else magnitude_keys(weight, keep)


def _numel_of(keys: Callable[[], torch.Tensor]) -> int:
    numel = getattr(keys, "numel", None)
    return int(numel) if numel is not None else _materialize(keys).numel()


def _histogram(keys: Keys, shift: int, bits: int, prefix: int | None, prefix_shift: int) -> torch.Tensor:
    """Histogram of ``(key >> shift) & (2**bits - 1)`` over keys whose ``key >> prefix_shift == prefix``."""
    hist = None
    low = (1 << bits) - 1
    for layer_keys in keys:
        if isinstance(layer_keys, _NativeMagnitudeKeys):
            if hist is None:
                hist = torch.zeros(1 << bits, dtype=torch.int64)
            layer_keys.histogram(layer_keys.weight, layer_keys.keep, shift, bits, prefix, prefix_shift, hist)
            continue
        tensor = _materialize(layer_keys)
        if hist is None:
            hist = torch.zeros(1 << bits, dtype=torch.int64, device=tensor.device)
        flat = tensor.reshape(-1)
        for chunk in flat.split(_CHUNK):
            if prefix is not None:
                chunk = chunk[(chunk >> prefix_shift) == prefix]
                if chunk.numel() == 0:
                    continue
            digits = (chunk >> shift) & low
            hist += torch.bincount(digits, minlength=1 << bits)
        tensor = flat = chunk = None  # drop this layer's keys before the next layer's are built
    return hist if hist is not None else torch.zeros(1 << bits, dtype=torch.int64)


def kth_smallest_key(keys: Keys, k: int, sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[int, int]:
    """The k-th smallest key (1-based) over all ``keys`` and how many keys are strictly smaller.

    Three histogram passes over 11/10/10-bit digits of the (non-negative) int32 keys. Each layer's
    keys may be given as a callable that builds them, so only one layer's keys exist at a time.
    ``sum_over_ranks`` (in place, e.g. an all-reduce): the keys are this rank's part of a selection
    over all ranks' keys; only the histograms travel.

    >>> kth_smallest_key([torch.tensor([5, 1, 3]), torch.tensor([3, 9])], 3)
    (3, 1)
    """
    reduce = sum_over_ranks or (lambda t: t)
    total = int(reduce(torch.tensor([sum(_numel_of(t) if callable(t) else t.numel() for t in keys)], dtype=torch.int64)))
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside [1, {total}]")
    prefix, prefix_shift, below = None, 31, 0
    for shift, bits in ((20, 11), (10, 10), (0, 10)):
        hist = reduce(_histogram(keys, shift, bits, prefix, prefix_shift))
        cum = torch.cumsum(hist, 0)
        digit = int(torch.searchsorted(cum, torch.tensor(k - below, device=cum.device), right=False))
        below += int(cum[digit - 1]) if digit > 0 else 0
        prefix = digit if prefix is None else (prefix << bits) | digit
        prefix_shift = shift
    return prefix, below


def select_smallest(keys: Keys, k: int) -> list[torch.Tensor]:
    """Bool masks marking exactly the ``k`` smallest keys (ties by list order, then flat index)."""
    if k <= 0:
        return [torch.zeros_like(_materialize(t), dtype=torch.bool) for t in keys]
    threshold, below = kth_smallest_key(keys, k)
    ties_left = k - below
    masks = []
    for layer_keys in keys:
        chosen, n_equal = _take_below(_materialize(layer_keys), threshold, ties_left)
        masks.append(chosen)
        ties_left = max(ties_left - n_equal, 0)
    return masks


def _take_below(keys: torch.Tensor, threshold: int, ties: int) -> tuple[torch.Tensor, int]:
    """Bool mask of the keys below ``threshold`` and the first ``ties`` equal to it (flat order),
    and how many keys equal it."""
    chosen = keys < threshold
    equal = keys == threshold
    n_equal = int(equal.sum())
    if ties >= n_equal:
        chosen |= equal
    elif ties > 0:
        chosen |= equal & (equal.reshape(-1).cumsum(0).view(keys.shape) <= ties)
    return chosen, n_equal


def _apply_selection(keeps: Sequence[torch.Tensor | None], shapes, newly: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for keep, shape, new in zip(keeps, shapes, newly):
        base = torch.ones(shape, dtype=torch.uint8, device=new.device) if keep is None else keep.clone()
        base.masked_fill_(new.view(shape), 0)
        out.append(base)
    return out


def _prune_natively(keys: Sequence[_NativeMagnitudeKeys], k: int) -> list[torch.Tensor]:
    """New keep masks pruning the ``k`` smallest magnitude keys more, ties by layer then index order."""
    if k <= 0:
        return [torch.ones(t.weight.shape, dtype=torch.uint8) if t.keep is None else t.keep.clone() for t in keys]
    threshold, below = kth_smallest_key(keys, k)
    ties, out = k - below, []
    for source in keys:
        new_keep, taken = source.prune_below(source.weight, source.keep, threshold, max(ties, 0))
        ties -= taken
        out.append(new_keep)
    return out


def _prune_by_keys(weights, keeps, keys_per_layer, target: float, scope: str, keep_at_least: int) -> list[torch.Tensor]:
    """Prune the smallest keys up to ``target``, leaving ``keep_at_least`` weights (per layer, or over
    all layers for ``scope="global"``)."""
    numels = [w.numel() for w in weights]
    pruned_now = [n - (int(k.sum(dtype=torch.int64)) if k is not None else n) for k, n in zip(keeps, numels)]
    if all(isinstance(keys, _NativeMagnitudeKeys) for keys in keys_per_layer):
        if scope == "global":
            return _prune_natively(keys_per_layer, count_to_prune(sum(numels), target, keep_at_least) - sum(pruned_now))
        return [_prune_natively([keys], count_to_prune(n, target, keep_at_least) - done)[0]
                for keys, n, done in zip(keys_per_layer, numels, pruned_now)]
    if scope == "global":
        k_new = count_to_prune(sum(numels), target, keep_at_least) - sum(pruned_now)
        newly = select_smallest(keys_per_layer, k_new)
    else:
        newly = [
            select_smallest([keys], count_to_prune(n, target, keep_at_least) - done)[0]
            for keys, n, done in zip(keys_per_layer, numels, pruned_now)
        ]
    return _apply_selection(keeps, [w.shape for w in weights], newly)


def _largest_kept(weight: torch.Tensor, keep: torch.Tensor | None) -> tuple[float, int]:
    """``(|w|, flat index)`` of the largest kept weight (the first of equals), or ``(-1.0, -1)`` if none."""
    scores = weight.detach().reshape(-1).abs().to(torch.float32)
    if keep is not None:
        scores = scores.masked_fill(keep.reshape(-1) == 0, -1.0)
    if scores.numel() == 0:
        return -1.0, -1
    index = int(scores.argmax())
    value = float(scores[index])
    return (value, index) if value >= 0 else (-1.0, -1)


def _guard(weight: torch.Tensor, keep: torch.Tensor | None, index: int) -> torch.Tensor | None:
    """``keep`` with flat ``index`` marked pruned, so that no selection takes it (``index < 0``: ``keep``)."""
    if index < 0:
        return keep
    guarded = torch.ones(weight.shape, dtype=torch.uint8, device=weight.device) if keep is None else keep.clone()
    guarded.view(-1)[index] = 0
    return guarded


def _unguard_(keeps: list[torch.Tensor], indices: Sequence[int]) -> list[torch.Tensor]:
    """Mark each guarded weight kept again in the selection's masks (in place)."""
    for keep, index in zip(keeps, indices):
        if index >= 0:
            keep.view(-1)[index] = 1
    return keeps


def unstructured_keep_masks(
    weights: Sequence[torch.Tensor],
    target: float,
    keeps: Sequence[torch.Tensor | None] | None = None,
    scope: str = "layer",
) -> list[torch.Tensor]:
    """Keep masks pruning the smallest ``|w|`` to ``target`` sparsity (per layer or over all of them).

    Already-pruned weights (``keep == 0``) stay pruned. Every layer keeps at least its largest weight:
    with ``scope="global"`` it is left out of the selection, which takes the next smallest elsewhere,
    so the overall count stays exact unless the target leaves fewer weights than layers. For
    ``scope="layer"`` each keys tensor is built and dropped one layer at a time, so the extra peak
    memory is about one layer.

    >>> small, large = torch.tensor([0.1, 0.2]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    >>> [k.tolist() for k in unstructured_keep_masks([small, large], 0.5, scope="global")]
    [[0, 1], [0, 0, 1, 1]]
    """
    keeps = list(keeps) if keeps is not None else [None] * len(weights)
    if scope == "layer":
        out = []
        for w, keep in zip(weights, keeps):
            out += _prune_by_keys([w], [keep], [magnitude_key_source(w, keep, lazy=False)], target, "layer", 1)
        return out
    largest = [_largest_kept(w, keep)[1] for w, keep in zip(weights, keeps)]
    guarded = [_guard(w, keep, index) for w, keep, index in zip(weights, keeps, largest)]
    # read in place by the native kernels, or built on demand layer by layer in every pass: extra peak
    # memory stays about one layer
    keys = [magnitude_key_source(w, keep) for w, keep in zip(weights, guarded)]
    out = _prune_by_keys(weights, keeps, keys, target, "global", sum(index >= 0 for index in largest))
    return _unguard_(out, largest)


def channel_keep_masks(
    weights: Sequence[torch.Tensor],
    target: float,
    keeps: Sequence[torch.Tensor | None] | None = None,
    scope: str = "layer",
    out_dims: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Keep masks removing whole output channels with the smallest L2 norm.

    Output channels index dim ``out_dims[i]`` of each weight (default 0; 1 for Transformers Conv1D
    ``[in, out]`` and ConvTranspose ``[in, out, ...]``). ``scope="layer"`` prunes
    ``round(target * out_channels)`` channels per layer. ``scope="global"`` ranks channels of all
    layers by RMS (norm / sqrt(fan_in), comparable across layers of different width) and prunes the
    smallest until as many weights as possible, but no more than ``round(target * total)``, are
    pruned. Either way each layer keeps at least its strongest channel. Channels already all-zero in
    ``keeps`` stay pruned.

    >>> w = torch.tensor([[1.0, 1.0], [0.1, 0.1], [2.0, 0.0]])
    >>> channel_keep_masks([w], 0.34)[0].tolist()
    [[1, 1], [0, 0], [1, 1]]
    >>> channel_keep_masks([w.t()], 0.34, out_dims=[1])[0].tolist()   # the same layer stored [in, out]
    [[1, 0, 1], [1, 0, 1]]
    """
    keeps = list(keeps) if keeps is not None else [None] * len(weights)
    out_dims = list(out_dims) if out_dims is not None else [0] * len(weights)
    scores, dead = channel_scores(weights, keeps, scope, out_dims)
    fan_ins = [w.numel() // max(w.shape[d], 1) for w, d in zip(weights, out_dims)]
    return expand_channels(weights, keeps, channels_to_prune(scores, dead, fan_ins, target, scope), out_dims)


def channel_scores(
    weights: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor | None], scope: str,
    out_dims: Sequence[int] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per output channel of each weight: its score (L2 norm; RMS for global scope) and whether it
    is already pruned (all-zero in ``keeps``)."""
    scores, dead = [], []
    for w, keep, out_dim in zip(weights, keeps, out_dims or [0] * len(weights)):
        rows = channels_first(w.detach(), out_dim).to(torch.float32)
        score = rows.norm(dim=1)
        if scope == "global":
            score = score / math.sqrt(max(rows.shape[1], 1))
        scores.append(score)
        if keep is None or keep.numel() == 0:
            dead.append(torch.zeros(rows.shape[0], dtype=torch.bool, device=w.device))
        else:
            dead.append(channels_first(keep, out_dim).amax(1) == 0)
    return scores, dead


def channels_to_prune(
    scores: Sequence[torch.Tensor], dead: Sequence[torch.Tensor], fan_ins: Sequence[int], target: float, scope: str
) -> list[torch.Tensor]:
    """Bool per output channel: pruned after this update (see :func:`channel_keep_masks`); each layer's
    strongest live channel (the first of equals) is never chosen."""
    if scope == "layer":
        chosen = []
        for score, gone in zip(scores, dead):
            keys = magnitude_keys(score, (~gone).to(torch.uint8))
            k = count_to_prune(score.numel(), target, keep_at_least=1) - int(gone.sum())
            chosen.append(select_smallest([keys], k)[0] | gone)
        return chosen
    strongest = []
    for score, gone in zip(scores, dead):
        mark = torch.zeros_like(gone)
        if not bool(gone.all()):
            mark[int(score.masked_fill(gone, -1.0).argmax())] = True
        strongest.append(mark)
    sizes = torch.cat([torch.full_like(s, n, dtype=torch.int64) for s, n in zip(scores, fan_ins)])
    # pruned channels first (their weights count against the budget), the strongest of each layer last
    flat_scores = torch.cat([s.masked_fill(d, -1.0).masked_fill(k, math.inf) for s, d, k in zip(scores, dead, strongest)])
    budget = count_to_prune(sum(s.numel() * n for s, n in zip(scores, fan_ins)), target)
    order = torch.sort(flat_scores, stable=True).indices
    cumulative = sizes[order].cumsum(0)
    dead_all = torch.cat(list(dead))
    take = ((cumulative <= budget) & ~torch.cat(strongest)[order]) | dead_all[order]
    flat = torch.zeros_like(dead_all)
    flat[order[take]] = True
    return list(flat.split([s.numel() for s in scores]))


def expand_channels(
    weights: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor | None], chosen: Sequence[torch.Tensor],
    out_dims: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Keep masks with the ``chosen`` output channels (along ``out_dims``, default 0) pruned on top of ``keeps``."""
    out = []
    for w, keep, rows, out_dim in zip(weights, keeps, chosen, out_dims or [0] * len(weights)):
        base = torch.ones(w.shape, dtype=torch.uint8, device=w.device) if keep is None else keep.clone()
        base.masked_fill_(rows.view([-1 if dim == out_dim else 1 for dim in range(w.dim())]), 0)
        out.append(base)
    return out


def units_to_prune(
    scores: torch.Tensor, sizes: torch.Tensor, dead: torch.Tensor, families: torch.Tensor, target: float, scope: str,
    total: int | None = None,
) -> torch.Tensor:
    """Bool per unit (a group of coupled channels, or an attention head): pruned after this update.

    ``scores``: one per unit (L2 norm over every weight it owns; for ``scope="global"`` its RMS,
    comparable across families); ``sizes``: the weights each unit owns; ``dead``: units already
    pruned (they stay pruned and count); ``families``: units of one family (the same layers) share a
    per-layer target. ``scope="layer"`` prunes ``round(target * units)`` of every family, leaving it
    at least one unit;
    ``"global"`` prunes the lowest-scoring units while the weights they own stay within
    ``round(target * total)`` (``total``: all targeted weights, default the units' own), leaving
    every family at least one unit. Ties go by unit order. Below, family 1 has one unit: it stays.

    >>> units_to_prune(torch.tensor([3.0, 1.0, 2.0, 0.5]), torch.tensor([4, 4, 4, 2]),
    ...                torch.zeros(4, dtype=torch.bool), torch.tensor([0, 0, 0, 1]), 0.5, "layer").tolist()
    [False, True, True, False]
    """
    chosen = dead.clone()
    if scope == "layer":
        for family in torch.unique(families).tolist():
            members = (families == family).nonzero().squeeze(1)
            keys = magnitude_keys(scores[members], (~dead[members]).to(torch.uint8))
            k = count_to_prune(members.numel(), target, keep_at_least=1) - int(dead[members].sum())
            chosen[members] |= select_smallest([keys], k)[0]
        return chosen
    budget = count_to_prune(int(sizes.sum()) if total is None else total, target) - int(sizes[dead].sum())
    alive = torch.bincount(families[~dead], minlength=int(families.max()) + 1 if families.numel() else 0).tolist()
    for unit in torch.sort(scores.masked_fill(dead, -1.0), stable=True).indices[int(dead.sum()):].tolist():
        size, family = int(sizes[unit]), int(families[unit])
        if size > budget:
            break
        if alive[family] > 1:  # a family keeps at least one unit: a layer is never emptied
            chosen[unit], alive[family], budget = True, alive[family] - 1, budget - size
    return chosen


def parse_nm(granularity: str) -> tuple[int, int] | None:
    """``"2:4"`` -> ``(2, 4)``; None for other granularities.

    >>> parse_nm("2:4")
    (2, 4)
    """
    if ":" not in granularity:
        return None
    n_text, m_text = granularity.split(":", 1)
    if not (n_text.isdigit() and m_text.isdigit()) or not 0 < int(n_text) < int(m_text):
        raise ValueError(f"`granularity`: N:M needs integers 0 < N < M, e.g. '2:4'; got {granularity!r}")
    return int(n_text), int(m_text)


def nm_groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """View a ``[out, ...]`` weight as ``[-1, M]`` groups along the input dimension (last dim; Conv: in x kernel)."""
    return weight.reshape(weight.numel() // m, m)  # explicit sizes: an empty block (0 rows) reshapes too


def nm_keep_masks(
    weights: Sequence[torch.Tensor],
    target: float,
    n: int,
    m: int,
    keeps: Sequence[torch.Tensor | None] | None = None,
    scope: str = "layer",
    out_dims: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Keep masks on the way to N:M sparsity: only the ``M - N`` smallest of each group may be pruned.

    Groups are ``M`` consecutive weights of one output channel along its inputs: the last dim of a
    ``[out, in]`` weight, the flattened in x kernel dims of a conv; for a weight whose output channels
    index dim ``out_dims[i]`` (1: Transformers Conv1D ``[in, out]``, ConvTranspose), the other dims.
    At ``target = 1 - N/M`` every group keeps exactly its N largest weights; below it, the smallest
    candidates are pruned first, so a gradual schedule ends on a valid N:M pattern.

    >>> w = torch.tensor([[4.0, 1.0, 3.0, 2.0, -5.0, 0.5, 6.0, -7.0]])
    >>> nm_keep_masks([w], 0.5, 2, 4)[0].tolist()
    [[1, 0, 1, 0, 0, 0, 1, 1]]
    >>> nm_keep_masks([w.reshape(2, 4).t()], 0.5, 2, 4, out_dims=[1])[0].t().tolist()   # stored [in, out]
    [[1, 0, 1, 0], [0, 0, 1, 1]]
    """
    keeps = list(keeps) if keeps is not None else [None] * len(weights)
    out_dims = list(out_dims) if out_dims is not None else [0] * len(weights)
    keys_per_layer = [_LazyKeys(_nm_keys, w, keep, n, m, d) for w, keep, d in zip(weights, keeps, out_dims)]
    return _prune_by_keys(weights, keeps, keys_per_layer, target, scope, keep_at_least=0)


def _nm_keys(w: torch.Tensor, keep: torch.Tensor | None, n: int, m: int, out_dim: int = 0) -> torch.Tensor:
    """One layer's N:M candidate keys: magnitudes, with each group's N largest (and the pruned) never selected."""
    if out_dim != 0:  # groups run along the inputs of each output channel: work on [out, ...], answer in w's layout
        moved = _nm_keys(w.movedim(out_dim, 0), None if keep is None else keep.movedim(out_dim, 0), n, m)
        return moved.movedim(0, out_dim).contiguous()
    groups = nm_groups(w.detach(), m).to(torch.float32).abs()
    if keep is not None:
        groups = groups.masked_fill(nm_groups(keep, m) == 0, -1.0)  # pruned first among candidates
    rank = groups.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    keys = magnitude_keys(groups.clamp_min(0.0), None)
    keys.masked_fill_(rank >= m - n, PRUNED_KEY)  # the N largest of each group are never candidates
    if keep is not None:
        keys.masked_fill_(nm_groups(keep, m) == 0, PRUNED_KEY)
    return keys.view(w.shape)


def keep_from_zeros(weight: torch.Tensor) -> torch.Tensor | None:
    """Keep mask marking a sparse checkpoint's existing zeros, or None when there are none.

    An all-zero weight (a zero-initialised layer, not a pruned one) gives None so it can train.

    >>> keep_from_zeros(torch.tensor([1.0, 0.0])).tolist()
    [1, 0]
    """
    nonzero = weight.detach() != 0
    count = int(nonzero.sum())
    if count == weight.numel() or count == 0:
        return None
    return nonzero.to(torch.uint8)


@torch.no_grad()
def apply_keep_(
    tensors: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor],
    scratch: torch.Tensor | None = None,
    kernel: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> None:
    """In place ``t *= keep`` for each pair, without a full-size float copy of any mask.

    On CPU, ``t.mul_(uint8_keep)`` first materialises a float copy of the whole mask (an allocation
    and an extra pass each call). ``kernel`` (``compress_callbacks._native.mask_multiply_kernel()``)
    does it in one pass for contiguous float32 CPU tensors. Otherwise, with ``scratch`` (a 1-D
    buffer of the tensors' dtype), the masks are converted slice by slice into it and applied with
    two foreach calls per buffer-full: the cost of multiplying by a float mask, with masks still one
    byte per weight. Tensors that are not contiguous, or of another dtype than ``scratch``, fall back
    to ``mul_``.

    >>> t, keep = torch.arange(1.0, 7.0), torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.uint8)
    >>> apply_keep_([t], [keep], scratch=torch.empty(4))
    >>> t.tolist()
    [1.0, 0.0, 3.0, 4.0, 0.0, 6.0]
    """
    if kernel is not None:
        rest = []
        for tensor, keep in zip(tensors, keeps):
            if native_layout(tensor, keep):
                kernel(tensor, keep)
            else:
                rest.append((tensor, keep))
        if not rest:
            return
        tensors, keeps = [t for t, _ in rest], [k for _, k in rest]
    if scratch is None:
        if tensors:
            torch._foreach_mul_(list(tensors), list(keeps))
        return
    capacity = scratch.numel()
    outs: list[torch.Tensor] = []
    ins: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    used = 0
    for tensor, keep in zip(tensors, keeps):
        if tensor.dtype != scratch.dtype or not (tensor.is_contiguous() and keep.is_contiguous()):
            tensor.mul_(keep)
            continue
        flat_t, flat_k = tensor.view(-1), keep.view(-1)
        start, numel = 0, flat_t.numel()
        while start < numel:
            take = min(numel - start, capacity - used)
            outs.append(flat_t[start:start + take])
            ins.append(flat_k[start:start + take])
            slots.append(scratch[used:used + take])
            used += take
            start += take
            if used == capacity:
                torch._foreach_copy_(slots, ins)
                torch._foreach_mul_(outs, slots)
                outs, ins, slots, used = [], [], [], 0
    if outs:
        torch._foreach_copy_(slots, ins)
        torch._foreach_mul_(outs, slots)
