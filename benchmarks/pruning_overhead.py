"""Per-step overhead of GMP vs plain training and PyTorch-native masking, interleaved in one process.

    python benchmarks/pruning_overhead.py [--quick]

Prints step-time ratios against a plain step (steady state at 90% sparsity, so every variant
masks every step), the time of one mask update vs per-layer ``torch.kthvalue``, and mask bytes per
targeted weight.
"""

from __future__ import annotations

import argparse
import time

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
    if variant == "gmp":
        manager = CompressionManager(GradualMagnitudePruning(sparsity, start_step=0, end_step=1, update_every=1))
        manager.attach(model, optimizer)
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
    return model, optimizer, after


def time_variants(make_model, shape, variants, sparsity, rounds, steps):
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    loss_fn = nn.CrossEntropyLoss()
    built = {v: build(v, make_model, sparsity) for v in variants}
    best = {v: float("inf") for v in variants}
    for _ in range(rounds):
        for v, (model, optimizer, after) in built.items():
            start = time.perf_counter()
            for _ in range(steps):
                loss_fn(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
                if after:
                    after()
            best[v] = min(best[v], (time.perf_counter() - start) / steps)
    return best


def mask_update_times(quick: bool, repeats: int = 3):
    torch.manual_seed(0)
    model = mlp(quick)
    weights = [m.weight.detach() for m in targets(model)]
    from compress_callbacks.pruning.masks import unstructured_keep_masks

    def ours():
        unstructured_keep_masks(weights, 0.9)

    def ours_global():
        unstructured_keep_masks(weights, 0.9, scope="global")

    def kth():
        for w in weights:
            torch.kthvalue(w.abs().flatten(), int(0.9 * w.numel()))

    out = {}
    for name, fn in (("per-layer torch.kthvalue", kth), ("GMP mask update (layer)", ours), ("GMP mask update (global)", ours_global)):
        fn()
        t = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - t) / repeats * 1e3
    return out, sum(w.numel() for w in weights)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args(argv)
    rounds, steps = (3, 5) if args.quick else (7, 20)
    variants = ["plain", "gmp", "torch.nn.utils.prune", "float-mask multiply"]
    lines = [f"Pruning step overhead at {args.sparsity:.0%} sparsity (ratio vs plain step, best of {rounds} interleaved rounds)"]
    cases = [(lambda: mlp(args.quick), (64, 256 if args.quick else 1024), "MLP b64")]
    cases.append((lambda: mlp(args.quick), (256, 256 if args.quick else 1024), "MLP b256"))
    cases.append((cnn, (16, 3, 32, 32), "CNN b16"))
    header = f"{'variant':24s}" + "".join(f"{c[2]:>12s}" for c in cases)
    lines.append(header)
    results = [time_variants(make, shape, variants, args.sparsity, rounds, steps) for make, shape, _ in cases]
    for v in variants:
        lines.append(f"{v:24s}" + "".join(f"{r[v] / r['plain']:>11.3f}x" for r in results))
    lines.append(f"{'plain step (ms)':24s}" + "".join(f"{r['plain'] * 1e3:>12.2f}" for r in results))
    times, n = mask_update_times(args.quick)
    lines.append(f"\nMask update on the MLP ({n / 1e6:.2f}M targeted weights), ms:")
    for name, ms in times.items():
        lines.append(f"  {name:28s}{ms:8.1f}")
    lines.append("Mask memory: 1 byte per targeted weight (uint8 keep masks); float-mask baseline: 4.")
    table = "\n".join(lines)
    return table


if __name__ == "__main__":
    print(main())
