"""Pure math: the cubic schedule and exact, deterministic mask selection."""

import math

import pytest
import torch

from compress_callbacks.pruning import masks as M
from compress_callbacks.pruning.sharded import sharded_keep_masks
from compress_callbacks.schedules import cubic_sparsity, last_grid_point, schedule_grid


def reference_cubic(t, si, sf, t0, t1):
    return sf + (si - sf) * (1 - (t - t0) / (t1 - t0)) ** 3


@pytest.mark.parametrize("step", [0, 99, 100, 101, 149, 150, 420, 999, 1000, 5000])
def test_cubic_matches_formula_on_grid(step):
    got = cubic_sparsity(step, initial=0.1, final=0.9, start=100, end=1000, every=50)
    if step < 100:
        assert got == 0.0
    elif step >= 1000:
        assert got == 0.9
    else:
        grid = 100 + ((step - 100) // 50) * 50
        assert got == pytest.approx(reference_cubic(grid, 0.1, 0.9, 100, 1000), abs=1e-12)


def test_schedule_is_monotone_and_lands_exactly():
    values = [cubic_sparsity(t, initial=0.0, final=0.98, start=3, end=97, every=7) for t in range(200)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[97] == 0.98 and values[-1] == 0.98
    assert last_grid_point(96, start=3, end=97, every=7) == 94
    assert schedule_grid(start=3, end=97, every=7)[-1] == 97


@pytest.mark.parametrize("seed", range(5))
def test_kth_smallest_key_agrees_with_kthvalue(seed):
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(s, generator=g) * 0.02 for s in (1000, 3, 2500)]
    parts[1][:] = parts[0][:3]  # duplicates across tensors
    keys = [M.magnitude_keys(p, None) for p in parts]
    flat = torch.cat([p.abs() for p in parts])
    for k in (1, 17, 1800, flat.numel()):
        key, below = M.kth_smallest_key(keys, k)
        expected = torch.kthvalue(flat, k).values
        assert torch.tensor([key], dtype=torch.int32).view(torch.float32).item() == expected.item()
        assert below == int((flat < expected).sum())


def test_unstructured_exact_count_and_ties_by_index():
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 3.0]])
    keep = M.unstructured_keep_masks([w], 0.5)[0]
    assert keep.dtype == torch.uint8
    assert keep.tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]


def test_unstructured_monotone_even_with_zero_ties():
    w = torch.tensor([0.0, 0.0, 0.0, 5.0, 6.0, 7.0])
    prior = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.uint8)  # position 2 already pruned
    keep = M.unstructured_keep_masks([w], 1 / 3, keeps=[prior])[0]
    assert keep[2] == 0 and int((keep == 0).sum()) == 2


@pytest.mark.parametrize("target", [0.3, 0.9, 0.98])
def test_layer_and_global_hit_exact_counts(target):
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(64, 33, generator=g), torch.randn(10, 64, generator=g) * 5, torch.randn(7, generator=g)]
    layer = M.unstructured_keep_masks(ws, target)
    for w, keep in zip(ws, layer):  # at 0.98 the 7-weight layer would round to 7: it keeps its last one
        assert int((keep == 0).sum()) == min(M.count_to_prune(w.numel(), target), w.numel() - 1)
    glob = M.unstructured_keep_masks(ws, target, scope="global")
    total = sum(w.numel() for w in ws)
    assert sum(int((k == 0).sum()) for k in glob) == M.count_to_prune(total, target)
    # global keeps the largest magnitudes overall, besides each layer's largest weight, which always stays
    for w, k in zip(ws, glob):
        assert k.reshape(-1)[w.abs().argmax()] == 1
    rest = [(w.reshape(-1), k.reshape(-1).clone()) for w, k in zip(ws, glob)]
    for w, k in rest:
        k[w.abs().argmax()] = 2  # set the layer's own largest aside
    kept_min = min(float(w[k == 1].abs().min()) for w, k in rest if (k == 1).any())
    pruned_max = max(float(w[k == 0].abs().max()) for w, k in rest if (k == 0).any())
    assert pruned_max <= kept_min


@pytest.mark.parametrize("granularity", ["unstructured", "channel"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_no_layer_is_pruned_away_and_the_overall_count_stays_exact(granularity, scope):
    """A small layer among large ones: the selection would empty it (global: its weights are the
    smallest; layer: 0.95 of 8 weights or of 4 channels rounds to all of them). It keeps its largest weight / strongest channel, and
    global scope still prunes exactly the target overall, elsewhere."""
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(32, 16, generator=g), torch.randn(4, 2, generator=g) * 0.01, torch.randn(16, 32, generator=g)]
    select = M.unstructured_keep_masks if granularity == "unstructured" else M.channel_keep_masks
    keeps = select(ws, 0.95, scope=scope)
    for w, keep in zip(ws, keeps):
        if granularity == "unstructured":
            assert keep.reshape(-1)[w.abs().argmax()] == 1
        else:
            assert keep[w.norm(dim=1).argmax()].all()
    small = keeps[1]
    assert int(small.sum()) == (1 if granularity == "unstructured" else 2)  # the floor, not more
    pruned = sum(int((k == 0).sum()) for k in keeps)
    if granularity == "unstructured" and scope == "global":
        assert pruned == M.count_to_prune(sum(w.numel() for w in ws), 0.95)
    elif scope == "global":  # whole channels: as close to the budget as they fit
        budget = M.count_to_prune(sum(w.numel() for w in ws), 0.95)
        assert budget - 32 < pruned <= budget


def test_a_target_that_leaves_fewer_weights_than_layers_keeps_one_in_each():
    ws = [torch.tensor([1.0, 2.0]), torch.tensor([0.1, 0.2]), torch.tensor([5.0, 6.0])]
    keeps = M.unstructured_keep_masks(ws, 0.9, scope="global")  # 0.9 of 6 rounds to 5: only 3 can go
    assert [k.tolist() for k in keeps] == [[0, 1], [0, 1], [0, 1]]
    prior = [torch.tensor([0, 1], dtype=torch.uint8), None, None]
    keeps = M.unstructured_keep_masks(ws, 0.9, keeps=prior, scope="global")  # and with earlier masks
    assert [k.tolist() for k in keeps] == [[0, 1], [0, 1], [0, 1]]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_structured_masks_of_weights_stored_input_first_are_the_transposed_masks(scope):
    """Transformers Conv1D stores [in, out], ConvTranspose [in, out, kh, kw]: with ``out_dims`` their
    channel and N:M masks are those of the same layer stored output-first, moved back."""
    g = torch.Generator().manual_seed(5)
    out_first = [torch.randn(12, 8, generator=g), torch.randn(6, 4, 2, 2, generator=g)]
    stored = [out_first[0].t().contiguous(), out_first[1].movedim(0, 1).contiguous()]
    prior = [None, (torch.rand(6, 4, 2, 2, generator=g) > 0.3).to(torch.uint8)]
    stored_prior = [None, prior[1].movedim(0, 1).contiguous()]
    expected = M.channel_keep_masks(out_first, 0.5, keeps=prior, scope=scope)
    got = M.channel_keep_masks(stored, 0.5, keeps=stored_prior, scope=scope, out_dims=[1, 1])
    assert torch.equal(got[0], expected[0].t()) and torch.equal(got[1], expected[1].movedim(0, 1))
    expected = M.nm_keep_masks(out_first, 0.3, 2, 4, keeps=prior, scope=scope)
    got = M.nm_keep_masks(stored, 0.3, 2, 4, keeps=stored_prior, scope=scope, out_dims=[1, 1])
    assert torch.equal(got[0], expected[0].t()) and torch.equal(got[1], expected[1].movedim(0, 1))
    final = M.nm_keep_masks(stored, 0.5, 2, 4, scope=scope, out_dims=[1, 1])
    assert (final[0].t().reshape(-1, 4).sum(1) == 2).all()  # groups run along the inputs (dim 0 of [in, out])
    assert (final[1].movedim(1, 0).reshape(-1, 4).sum(1) == 2).all()


def test_channel_masks_remove_whole_rows_by_l2():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 3, 3, 3, generator=g)
    keep = M.channel_keep_masks([w], 0.25)[0]
    rows = keep.reshape(16, -1)
    assert all(r.min() == r.max() for r in rows)
    pruned = (rows[:, 0] == 0).nonzero().flatten()
    norms = w.reshape(16, -1).norm(dim=1)
    assert len(pruned) == 4
    assert set(pruned.tolist()) == set(norms.argsort()[:4].tolist())


def test_channel_global_never_exceeds_budget():
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(20, 8, generator=g), torch.randn(12, 20, generator=g)]
    keeps = M.channel_keep_masks(ws, 0.5, scope="global")
    pruned = sum(int((k == 0).sum()) for k in keeps)
    budget = M.count_to_prune(sum(w.numel() for w in ws), 0.5)
    assert budget - 20 < pruned <= budget


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_is_valid_and_gradual(n, m):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 4 * m, generator=g)
    final = 1 - n / m
    half = M.nm_keep_masks([w], final / 2, n, m)[0]
    assert int((half == 0).sum()) == M.count_to_prune(w.numel(), final / 2)
    keep = M.nm_keep_masks([w], final, n, m, keeps=[half])[0]
    groups = keep.reshape(-1, m)
    assert (groups.sum(1) == n).all()
    assert ((half == 0) <= (keep == 0)).all()  # monotone
    kept_vals = w.abs().reshape(-1, m)
    for grp, kv in zip(groups, kept_vals):
        assert kv[grp.bool()].min() >= kv[~grp.bool()].max()


def test_parse_nm_rejects_bad_patterns():
    assert M.parse_nm("unstructured") is None
    for bad in ("4:2", "0:4", "a:b", "2:2"):
        with pytest.raises(ValueError, match="granularity"):
            M.parse_nm(bad)


def test_keep_from_zeros_ignores_all_zero_layers():
    assert M.keep_from_zeros(torch.zeros(3, 3)) is None
    assert M.keep_from_zeros(torch.ones(3)) is None
    assert M.keep_from_zeros(torch.tensor([0.0, 2.0])).tolist() == [0, 1]
    assert math.isclose(M.sparsity(torch.tensor([0, 1, 1, 1], dtype=torch.uint8)), 0.25)


def test_apply_keep_matches_mul_across_scratch_boundaries_and_fallbacks():
    from compress_callbacks.pruning.masks import apply_keep_

    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (3,), (11, 4), (2, 3, 2)]
    tensors = [torch.randn(s, generator=g) for s in shapes]
    tensors.append(torch.randn(6, 4, generator=g).t())  # non-contiguous: falls back to mul_
    tensors.append(torch.randn(9, generator=g, dtype=torch.float64))  # other dtype: falls back
    keeps = [(torch.rand(t.shape, generator=g) > 0.5).to(torch.uint8) for t in tensors]
    expected = [t * k for t, k in zip(tensors, keeps)]
    scratch = torch.full((13,), float("nan"))  # capacity smaller than most tensors, odd size
    apply_keep_(tensors, keeps, scratch)
    for t, e in zip(tensors, expected):
        assert torch.equal(t, e)
    with_foreach = [torch.randn(4, 4, generator=g) for _ in range(2)]
    keeps = [(torch.rand(4, 4, generator=g) > 0.5).to(torch.uint8) for _ in range(2)]
    expected = [t * k for t, k in zip(with_foreach, keeps)]
    apply_keep_(with_foreach, keeps, None)
    assert all(torch.equal(t, e) for t, e in zip(with_foreach, expected))


@pytest.mark.parametrize("kind", ["unstructured", "unstructured, native", "2:4"])
def test_global_selection_holds_one_layers_keys_at_a_time(monkeypatch, kind):
    """scope='global' never materialises all layers' keys: extra peak memory stays about one layer
    (and with the native kernels, unstructured selection builds no keys at all)."""
    import weakref

    from compress_callbacks import _native

    native = kind == "unstructured, native"
    kind = kind.split(",")[0]
    if not native:
        monkeypatch.setattr(_native, "magnitude_select_kernels", lambda: None)
    else:  # the kernels build wherever there is a C compiler; without one this checks the fallback
        native = _native.c_compiler() is not None
        assert (_native.magnitude_select_kernels() is not None) == native

    alive, peak = [0], [0]
    builder = "magnitude_keys" if kind == "unstructured" else "_nm_keys"  # what builds one layer's keys
    original = getattr(M, builder)

    def counting(*args, **kwargs):
        keys = original(*args, **kwargs)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(keys, lambda: alive.__setitem__(0, alive[0] - 1))
        return keys

    monkeypatch.setattr(M, builder, counting)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 32, generator=g), torch.randn(32, 64, generator=g), torch.randn(16, 32, generator=g)]
    if kind == "unstructured":
        keeps = M.unstructured_keep_masks(weights, 0.7, scope="global")
        assert sum(int((k == 0).sum()) for k in keeps) == M.count_to_prune(sum(w.numel() for w in weights), 0.7)
    else:
        keeps = M.nm_keep_masks(weights, 0.5, 2, 4, scope="global")
        assert all(int(M.nm_groups(k, 4).sum(1).max()) <= 2 for k in keeps)
    assert peak[0] == (0 if native else 1), peak[0]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_native_magnitude_selection_equals_the_torch_path(monkeypatch, scope):
    """Same keep masks, bit for bit: heavy ties straddling the threads' ranges, NaN, -0.0, prior masks
    (and both equal to a stable sort's selection, which is what is checked without a C compiler)."""
    from compress_callbacks import _native

    assert (_native.magnitude_select_kernels() is not None) == (_native.c_compiler() is not None)
    g = torch.Generator().manual_seed(1)
    weights = [
        torch.randint(-3, 4, (300, 700), generator=g).float() / 4,  # 210k entries of 7 values: ties everywhere
        torch.randn(257, 129, generator=g),
        torch.tensor([0.0, -0.0, float("nan"), 1.0, -1.0, float("inf"), 2.0, -0.0]),
    ]
    priors = [None, (torch.rand(257, 129, generator=g) > 0.3).to(torch.uint8), None]
    for target in (0.1, 0.45, 0.8, 0.95):
        native = M.unstructured_keep_masks(weights, target, keeps=priors, scope=scope)
        with monkeypatch.context() as patch:
            patch.setattr(_native, "magnitude_select_kernels", lambda: None)
            reference = M.unstructured_keep_masks(weights, target, keeps=priors, scope=scope)
        for a, b in zip(native, reference):
            assert a.dtype == b.dtype == torch.uint8 and torch.equal(a, b), target
        groups = [list(zip(weights, priors))] if scope == "global" else [[pair] for pair in zip(weights, priors)]
        expected = [mask for group in groups for mask in stable_sort_selection(*zip(*group), target, scope)]
        assert [torch.equal(a.flatten(), b) for a, b in zip(native, expected)] == [True] * len(weights), target


def stable_sort_selection(weights, keeps, target, scope="global"):
    """Reference: prune the smallest magnitude keys (ties by layer, then index) until ``target`` of
    all the weights given are pruned; already-pruned weights stay pruned, and each layer keeps a
    weight: in global scope its largest kept one (the first of equals), which the selection never
    takes; in layer scope the count stops one short of the layer."""
    keys = torch.cat([M.magnitude_keys(w, k).flatten() for w, k in zip(weights, keeps)])
    keep = torch.cat([torch.ones(w.numel(), dtype=torch.uint8) if k is None else k.flatten() for w, k in zip(weights, keeps)])
    offset, guarded = 0, 0
    for w in weights:
        layer = keep[offset:offset + w.numel()]
        if layer.any() and scope == "global":
            largest = w.flatten().abs().masked_fill(layer == 0, -1.0).argmax()
            keys[offset + largest] = M.PRUNED_KEY  # sorts last: never among the selected
            guarded += 1
        offset += w.numel()
    newly = min(M.count_to_prune(keys.numel(), target) - int((keep == 0).sum()), int(keep.sum()) - (guarded if scope == "global" else len(weights)))
    keep[torch.sort(keys, stable=True).indices[:max(newly, 0)]] = 0
    return list(keep.split([w.numel() for w in weights]))


class _ThreadRanks:
    """Collectives for ``world`` threads standing in for ranks (sum and gather over a barrier)."""

    def __init__(self, world: int):
        import threading

        self.world, self.barrier, self.slots = world, threading.Barrier(world), [None] * world

    def _exchange(self, rank: int, values: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = values.clone()
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()
        return everyone

    def sum(self, rank: int, values: torch.Tensor) -> torch.Tensor:
        return values.copy_(torch.stack(self._exchange(rank, values)).sum(0))

    def gather(self, rank: int, values: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._exchange(rank, values))


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("native", [True, False])
def test_sharded_selection_equals_the_whole_weights_selection(world, scope, nm, native, monkeypatch):
    """Rows split into torch.chunk blocks over ``world`` ranks (uneven; with 5 ranks a 4-row weight
    leaves one rank an empty block): each rank's masks are its block of the single-process masks,
    ties at the threshold spanning ranks and layers included, and with prior masks."""
    if not native:
        monkeypatch.setenv("COMPRESS_CALLBACKS_NATIVE", "0")
    g = torch.Generator().manual_seed(world)
    weights = [torch.randint(-3, 4, shape, generator=g).float() / 4 for shape in ((12, 8), (4, 16), (7, 4))]
    keeps = [None, (torch.rand(4, 16, generator=g) > 0.2).to(torch.uint8), None]
    _assert_sharded_equals_single_process(world, weights, keeps, 0.4, scope, nm)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("native", [True, False])
def test_sharded_selection_keeps_each_layers_largest_weight_as_a_single_process(world, scope, native, monkeypatch):
    """At 0.97 the selection would empty layers (global: the small layer; layer scope: 0.97 of 6
    rounds to 6); the weight kept in each is the same one a single process keeps, wherever its
    rank, ties for the largest spanning ranks included."""
    if not native:
        monkeypatch.setenv("COMPRESS_CALLBACKS_NATIVE", "0")
    g = torch.Generator().manual_seed(world)
    weights = [torch.randint(-3, 4, (12, 8), generator=g).float() / 4, torch.full((6, 1), 0.01),
               torch.randint(-3, 4, (7, 4), generator=g).float() / 4]
    weights[1][4, 0] = 0.02  # the small layer's largest, on the last rank's block
    keeps = [None, None, (torch.rand(7, 4, generator=g) > 0.2).to(torch.uint8)]
    expected = _assert_sharded_equals_single_process(world, weights, keeps, 0.97, scope, None)
    assert int(expected[1].sum()) == 1 and expected[1][4, 0] == 1


def _assert_sharded_equals_single_process(world, weights, keeps, target, scope, nm):
    """Select on blocks of rows over ``world`` thread-ranks; each rank's masks must be its block of
    the single-process masks (returned)."""
    import threading

    select = M.unstructured_keep_masks if nm is None else (lambda w, t, keeps, scope: M.nm_keep_masks(w, t, *nm, keeps=keeps, scope=scope))
    expected = select(weights, target, keeps=keeps, scope=scope)
    ranks, results, errors = _ThreadRanks(world), [None] * world, []

    def run(rank: int) -> None:
        try:
            blocks = [torch.chunk(w, world)[rank] if rank < len(torch.chunk(w, world)) else w[:0] for w in weights]
            block_keeps = [None if k is None else (torch.chunk(k, world)[rank] if rank < len(torch.chunk(k, world)) else k[:0]).contiguous()
                           for k in keeps]
            results[rank] = sharded_keep_masks(
                [b.contiguous() for b in blocks], block_keeps, [w.numel() for w in weights], target, scope,
                sum_over_ranks=lambda t: ranks.sum(rank, t), gather_over_ranks=lambda t: ranks.gather(rank, t),
                rank=rank, nm=nm)
        except BaseException as error:  # noqa: BLE001  surfaced below; a dead thread would hang the others
            errors.append(error)
            ranks.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for layer, want in enumerate(expected):
        got = torch.cat([results[r][layer].reshape(-1, *want.shape[1:]) for r in range(world)])
        assert torch.equal(got, want), (world, scope, nm, layer)
    return expected


@pytest.mark.parametrize("world", [2, 5])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("target", [0.4, 0.9])
def test_channel_selection_from_gathered_block_scores_equals_the_whole_weights(world, scope, target):
    """What FSDP2 ranks do for channel pruning: score their blocks of rows (some empty with 5 ranks),
    gather the scores whole, select, and expand on their blocks (at 0.9 with each layer's strongest
    channel kept)."""
    g = torch.Generator().manual_seed(world)
    weights = [torch.randint(-3, 4, shape, generator=g).float() / 4 for shape in ((12, 8), (4, 16), (3, 2, 2))]
    keeps = [None, torch.ones(4, 16, dtype=torch.uint8), None]
    keeps[1][2] = 0  # a channel already pruned
    expected = M.channel_keep_masks(weights, target, keeps=keeps, scope=scope)
    assert all(bool(M.channels_first(k).amax(1).any()) for k in expected)

    def block(t, rank):
        parts = torch.chunk(t, world)
        return parts[rank].contiguous() if rank < len(parts) else t[:0]

    per_rank = [M.channel_scores([block(w, r) for w in weights], [None if k is None else block(k, r) for k in keeps], scope)
                for r in range(world)]
    scores = [torch.cat([per_rank[r][0][i] for r in range(world)]) for i in range(len(weights))]
    dead = [torch.cat([per_rank[r][1][i] for r in range(world)]) for i in range(len(weights))]
    chosen = M.channels_to_prune(scores, dead, [math.prod(w.shape[1:]) for w in weights], target, scope)
    for r in range(world):
        masks = M.expand_channels([block(w, r) for w in weights], [None if k is None else block(k, r) for k in keeps],
                                  [block(rows, r) for rows in chosen])
        for mask, want in zip(masks, expected):
            assert torch.equal(mask, block(want, r))
