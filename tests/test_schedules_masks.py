"""Pure math: the cubic schedule and exact, deterministic mask selection."""

import inspect
import math

import pytest
import torch

from compress_callbacks.pruning import masks as M
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
    for w, keep in zip(ws, layer):
        assert int((keep == 0).sum()) == M.count_to_prune(w.numel(), target)
    glob = M.unstructured_keep_masks(ws, target, scope="global")
    total = sum(w.numel() for w in ws)
    assert sum(int((k == 0).sum()) for k in glob) == M.count_to_prune(total, target)
    # global keeps the largest magnitudes overall
    kept_min = min(float(w[k.bool()].abs().min()) for w, k in zip(ws, glob) if k.any())
    pruned_max = max(float(w[~k.bool()].abs().max()) for w, k in zip(ws, glob) if (~k.bool()).any())
    assert pruned_max <= kept_min


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
    else:
        assert _native.magnitude_select_kernels() is not None, "the native kernels must build on this machine"

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
    """Same keep masks, bit for bit: heavy ties straddling the threads' ranges, NaN, -0.0, prior masks."""
    from compress_callbacks import _native

    assert _native.magnitude_select_kernels() is not None
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


# ---------------------------------------------------------------------------- native mask kernel
@pytest.fixture()
def fresh_native(monkeypatch, tmp_path):
    from compress_callbacks import _native

    monkeypatch.setenv("COMPRESS_CALLBACKS_CACHE", str(tmp_path / "cache"))
    _native._load.cache_clear()
    yield _native
    _native._load.cache_clear()


def test_native_kernel_builds_once_and_matches_mul(fresh_native, tmp_path):
    kernel = fresh_native.mask_multiply_kernel()
    assert kernel is not None, "the native kernel must build here (needs a C compiler with OpenMP, e.g. gcc)"
    assert len(list((tmp_path / "cache").glob("masks_*.so"))) == 1
    fresh_native._load.cache_clear()
    assert fresh_native.mask_multiply_kernel() is not None  # loads the cached library
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 65536, 200_003):  # serial and OpenMP-parallel sizes
        t = torch.randn(n, generator=g)
        keep = (torch.rand(n, generator=g) > 0.5).to(torch.uint8)
        expected = t * keep
        version = t._version
        kernel(t, keep)
        assert torch.equal(t, expected) and t._version > version
    # apply_keep_ sends what the kernel cannot take (non-contiguous, float64) to the torch path
    tensors = [torch.randn(6, 4, generator=g).t(), torch.randn(9, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g)]
    keeps = [(torch.rand(t.shape, generator=g) > 0.5).to(torch.uint8) for t in tensors]
    expected = [t * k for t, k in zip(tensors, keeps)]
    M.apply_keep_(tensors, keeps, None, kernel)
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))


def test_native_kernel_off_switch_and_broken_compiler_fall_back(fresh_native, monkeypatch):
    monkeypatch.setenv("COMPRESS_CALLBACKS_NATIVE", "0")
    assert fresh_native.mask_multiply_kernel() is None
    monkeypatch.setenv("COMPRESS_CALLBACKS_NATIVE", "1")
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert fresh_native.mask_multiply_kernel() is None
    # GMP still prunes exactly through the pure-PyTorch path
    from compress_callbacks import CompressionManager, GradualMagnitudePruning

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gmp = GradualMagnitudePruning(0.75, start_step=0, end_step=2, update_every=1)
    apply_keep, kernels = M.apply_keep_, []

    def recording_apply_keep(*args, **kwargs):  # every masking pass GMP makes, with the kernel it passes
        kernels.append(inspect.signature(apply_keep).bind(*args, **kwargs).arguments.get("kernel"))
        apply_keep(*args, **kwargs)

    monkeypatch.setattr(M, "apply_keep_", recording_apply_keep)
    CompressionManager(gmp).attach(model, optimizer)
    for _ in range(4):
        model(torch.randn(8, 16)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [round(s, 4) for s in gmp.layer_sparsities().values()] == [0.75, 0.75]
    assert kernels and all(kernel is None for kernel in kernels)


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
    import threading

    if not native:
        monkeypatch.setenv("COMPRESS_CALLBACKS_NATIVE", "0")
    g = torch.Generator().manual_seed(world)
    weights = [torch.randint(-3, 4, shape, generator=g).float() / 4 for shape in ((12, 8), (4, 16), (7, 4))]
    keeps = [None, (torch.rand(4, 16, generator=g) > 0.2).to(torch.uint8), None]
    select = M.unstructured_keep_masks if nm is None else (lambda w, t, keeps, scope: M.nm_keep_masks(w, t, *nm, keeps=keeps, scope=scope))
    target = 0.4
    expected = select(weights, target, keeps=keeps, scope=scope)
    ranks, results, errors = _ThreadRanks(world), [None] * world, []

    def run(rank: int) -> None:
        try:
            blocks = [torch.chunk(w, world)[rank] if rank < len(torch.chunk(w, world)) else w[:0] for w in weights]
            block_keeps = [None if k is None else (torch.chunk(k, world)[rank] if rank < len(torch.chunk(k, world)) else k[:0]).contiguous()
                           for k in keeps]
            results[rank] = M.sharded_keep_masks(
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


@pytest.mark.parametrize("world", [2, 5])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_channel_selection_from_gathered_block_scores_equals_the_whole_weights(world, scope):
    """What FSDP2 ranks do for channel pruning: score their blocks of rows (some empty with 5 ranks),
    gather the scores whole, select, and expand on their blocks."""
    g = torch.Generator().manual_seed(world)
    weights = [torch.randint(-3, 4, shape, generator=g).float() / 4 for shape in ((12, 8), (4, 16), (3, 2, 2))]
    keeps = [None, torch.ones(4, 16, dtype=torch.uint8), None]
    keeps[1][2] = 0  # a channel already pruned
    expected = M.channel_keep_masks(weights, 0.4, keeps=keeps, scope=scope)

    def block(t, rank):
        parts = torch.chunk(t, world)
        return parts[rank].contiguous() if rank < len(parts) else t[:0]

    per_rank = [M.channel_scores([block(w, r) for w in weights], [None if k is None else block(k, r) for k in keeps], scope)
                for r in range(world)]
    scores = [torch.cat([per_rank[r][0][i] for r in range(world)]) for i in range(len(weights))]
    dead = [torch.cat([per_rank[r][1][i] for r in range(world)]) for i in range(len(weights))]
    chosen = M.channels_to_prune(scores, dead, [math.prod(w.shape[1:]) for w in weights], 0.4, scope)
    for r in range(world):
        masks = M.expand_channels([block(w, r) for w in weights], [None if k is None else block(k, r) for k in keeps],
                                  [block(rows, r) for rows in chosen])
        for mask, want in zip(masks, expected):
            assert torch.equal(mask, block(want, r))
