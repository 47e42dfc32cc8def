"""Per-step overhead of GMP vs plain training and PyTorch-native masking, interleaved in one process.

    python benchmarks/pruning_overhead.py [--quick] [--rounds N]

Prints step-time ratios against a plain step (steady state at 90% sparsity, so every variant
masks every step), the time of one mask update vs per-layer ``torch.kthvalue`` and
``WeightNormSparsifier.step()``, and mask bytes per targeted weight.

Method: every round runs each variant for a few steps, in a freshly shuffled order; a variant's
ratio is the median over rounds of (its time / the plain step's time in the same round), with the
interquartile range. Pairing within a round cancels slow drifts of a shared machine, and the median
ignores rounds that another process disturbed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from compress_callbacks import CompressionManager, GradualMagnitudePruning


def mlp(quick: bool) -> nn.Module:
    sizes = [256, 512, 256, 10] if quick else [1024, 2048, 1024, 512, 10]
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10),
    )


def targets(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def build(variant: str, make_model, sparsity: float):
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    after = None
    if variant.startswith("gmp"):
        mask_gradients = "step" if "mask_gradients='step'" in variant else "backward"
        gmp = GradualMagnitudePruning(sparsity, start_step=0, end_step=1, update_every=1, mask_gradients=mask_gradients)
        CompressionManager(gmp).attach(model, optimizer)
        if variant == "gmp, pure-PyTorch path":
            gmp._kernel = None  # what runs without a C compiler or with COMPRESS_CALLBACKS_NATIVE=0
        # one real update reaches the final mask: steady state from then on
    elif variant == "torch.nn.utils.prune":
        for m in targets(model):
            torch_prune.l1_unstructured(m, "weight", amount=sparsity)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    elif variant == "float-mask multiply":
        masks = []
        for m in targets(model):
            w = m.weight.detach().abs()
            k = max(1, int(sparsity * w.numel()))
            thr = w.flatten().kthvalue(k).values
            masks.append((m.weight, (w > thr).float()))

        def after():
            with torch.no_grad():
                for p, mask in masks:
                    p.mul_(mask)
    elif variant == "torch.ao WeightNormSparsifier":
        sparsifier = weight_norm_sparsifier(model, sparsity)
        sparsifier.step()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    return model, optimizer, after


def weight_norm_sparsifier(model: nn.Module, sparsity: float):
    """torch.ao.pruning's unstructured sparsifier (a mask parametrization, applied in every forward)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.pruning import WeightNormSparsifier

        sparsifier = WeightNormSparsifier(sparsity_level=sparsity, sparse_block_shape=(1, 1), zeros_per_block=1)
        names = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name in names])
    return sparsifier


def interquartile_mean(values):
    """Mean of the middle half: nearly as precise as the mean, as robust to outliers as the median."""
    ordered = sorted(values)
    cut = len(ordered) // 4
    middle = ordered[cut:len(ordered) - cut] or ordered
    return sum(middle) / len(middle)


def time_variants(make_model, shape, variants, sparsity, rounds, steps, blocks=5, seed=0):
    """Each variant's step time over a plain step run right next to it, summarised over rounds.

    Every round visits the variants in a fresh random order and runs each one back to back with a
    plain step (which of the two goes first is random too); the ratio of that adjacent pair is one
    sample. Adjacent pairs cancel the machine's drift at the finest scale available. The rounds are
    split into ``blocks``, each with freshly built models and optimizers (built in random order, first
    round discarded as warm-up), so that no variant keeps a lucky or unlucky memory placement for the
    whole run. The summary is the interquartile mean of the samples (rounds another process
    disturbed fall outside it), with the quartiles.
    """
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    loss_fn = nn.CrossEntropyLoss()
    rng = random.Random(seed)
    failed: dict[str, str] = {}
    ratios: dict[str, list[float]] = {v: [] for v in variants if v != "plain"}
    plain_times: list[float] = []
    blocks = max(1, min(blocks, rounds))
    for block in range(blocks):
        built = {}
        for v in rng.sample(variants, len(variants)):
            if v in failed:
                continue
            try:
                built[v] = build(v, make_model, sparsity)
            except Exception as exc:  # a baseline that cannot handle this model is reported, not fatal
                failed[v] = f"{type(exc).__name__}: {str(exc)[:60]}"

        def timed(v):
            model, optimizer, after = built[v]
            start = time.perf_counter()
            for _ in range(steps):
                loss_fn(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
                if after:
                    after()
            return (time.perf_counter() - start) / steps

        others = [v for v in built if v != "plain"]
        block_rounds = rounds // blocks + (block < rounds % blocks)
        for r in range(block_rounds + 1):  # round 0 warms up this block's fresh models and is discarded
            rng.shuffle(others)
            for v in others:
                if rng.random() < 0.5:
                    base, t = timed("plain"), timed(v)
                else:
                    t, base = timed(v), timed("plain")
                if r:
                    ratios[v].append(t / base)
                    plain_times.append(base)
        del built
    out = {"plain": (1.0, 1.0, 1.0)}
    for v, samples in ratios.items():
        if v in failed:
            continue
        q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
        out[v] = (interquartile_mean(samples), q1, q3)
    out["plain ms"] = statistics.median(plain_times) * 1e3
    out["failed"] = failed
    return out


def mask_update_times(quick: bool, repeats: int = 3):
    torch.manual_seed(0)
    model = mlp(quick)
    weights = [m.weight.detach() for m in targets(model)]
    from compress_callbacks.pruning.masks import unstructured_keep_masks

    def ours():
        unstructured_keep_masks(weights, 0.9)

    def ours_global():
        unstructured_keep_masks(weights, 0.9, scope="global")

    def ours_torch_only():  # without the native kernels (no C compiler, or COMPRESS_CALLBACKS_NATIVE=0)
        from compress_callbacks import _native

        kernels = _native.magnitude_select_kernels
        _native.magnitude_select_kernels = lambda: None
        try:
            unstructured_keep_masks(weights, 0.9)
        finally:
            _native.magnitude_select_kernels = kernels

    def kth():
        for w in weights:
            torch.kthvalue(w.abs().flatten(), int(0.9 * w.numel()))

    sparsifier = weight_norm_sparsifier(mlp(quick), 0.9)

    fns = [("per-layer torch.kthvalue", kth), ("GMP mask update (layer)", ours), ("GMP mask update (global)", ours_global),
           ("GMP mask update, pure PyTorch", ours_torch_only),
           ("WeightNormSparsifier.step()", sparsifier.step)]
    out = {}
    for name, fn in fns:
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - t) / repeats * 1e3
    return out, sum(w.numel() for w in weights)


VARIANT_KEYS = ("gmp", "gmp-step", "gmp-pytorch", "prune", "wns", "float")  # --variants names, in table order


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=None, help="paired rounds per case (default 300, quick 6)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {','.join(VARIANT_KEYS)} (plain is always timed)")
    parser.add_argument("--cases", default=None, help="comma-separated subset of: b64,b256,cnn")
    parser.add_argument("--update-every", type=int, default=100, help="for the amortised mask-update cost")
    args = parser.parse_args(argv)
    rounds = args.rounds or (6 if args.quick else 300)
    steps = 1  # one step per variant per round: the tightest pairing
    variants = ["plain", "gmp", "gmp, mask_gradients='step'", "gmp, pure-PyTorch path", "torch.nn.utils.prune",
                "torch.ao WeightNormSparsifier", "float-mask multiply"]
    if args.variants:
        keys = dict(zip(VARIANT_KEYS, variants[1:]))
        chosen = [v.strip() for v in args.variants.split(",")]
        unknown = [v for v in chosen if v not in keys]
        if unknown:
            parser.error(f"--variants: unknown {unknown}; choose from {list(keys)}")
        variants = ["plain"] + [keys[k] for k in VARIANT_KEYS if k in chosen]
    lines = [
        f"Pruning step overhead at {args.sparsity:.0%} sparsity, SGD momentum, torch threads {torch.get_num_threads()}: "
        f"step time / an adjacent plain step: interquartile mean [quartiles] over {rounds} rounds in 5 blocks of "
        f"freshly built models; each round runs every variant, in shuffled order, next to a plain step "
        f"({steps} step{'s' if steps > 1 else ''} each)"
    ]
    cases = [(lambda: mlp(args.quick), (64, 256 if args.quick else 1024), "MLP b64")]
    cases.append((lambda: mlp(args.quick), (256, 256 if args.quick else 1024), "MLP b256"))
    cases.append((cnn, (16, 3, 32, 32), "CNN b16"))
    if args.cases:
        keys = {"b64": "MLP b64", "b256": "MLP b256", "cnn": "CNN b16"}
        chosen = [c.strip() for c in args.cases.split(",")]
        if any(c not in keys for c in chosen):
            parser.error(f"--cases: choose from {list(keys)}, got {chosen}")
        cases = [c for c in cases if c[2] in {keys[k] for k in chosen}]
    lines.append(f"{'variant':32s}" + "".join(f"{c[2]:>22s}" for c in cases))
    results = [time_variants(make, shape, variants, args.sparsity, rounds, steps) for make, shape, _ in cases]
    notes = []
    for v in variants:
        cells = "".join(f"{f'{r[v][0]:.3f}x [{r[v][1]:.3f}-{r[v][2]:.3f}]' if v in r else 'n/a':>22s}" for r in results)
        lines.append(f"{v:32s}{cells}")
        notes += [f"  n/a: {v} on {case[2]}: {r['failed'][v]}" for r, case in zip(results, cases) if v in r["failed"]]
    lines.append(f"{'plain step (ms)':32s}" + "".join(f"{r['plain ms']:>22.2f}" for r in results))
    lines += notes
    times, n = mask_update_times(args.quick)
    lines.append(f"\nMask update on the MLP ({n / 1e6:.2f}M targeted weights), ms:")
    for name, ms in times.items():
        lines.append(f"  {name:30s}{ms:8.1f}")
    b64 = results[0]
    amortised = times["GMP mask update (global)"] / b64["plain ms"] / args.update_every
    if cases[0][2] == "MLP b64" and "gmp" in b64:
        lines.append(
            f"GMP on MLP b64 during the schedule with update_every={args.update_every}: "
            f"{b64['gmp'][0]:.3f}x + {amortised:.3f} (mask updates amortised) = {b64['gmp'][0] + amortised:.3f}x; "
            f"after end_step: {b64['gmp'][0]:.3f}x"
        )
    from compress_callbacks._native import mask_multiply_kernel

    kernel = "native one-pass kernel (C, OpenMP)" if mask_multiply_kernel() is not None else "pure-PyTorch path (no C compiler)"
    lines.append(f"GMP masking here: {kernel}. Mask memory: 1 byte per targeted weight (uint8 keep masks); the "
                 "pure-PyTorch path adds one float scratch buffer of at most 2 MiB; float-mask baseline: 4 bytes per weight.")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
