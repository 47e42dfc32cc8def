"""GMP quality on scikit-learn's digits: GMP (layer/global) vs one-shot magnitude pruning + fine-tuning.

    python benchmarks/pruning_quality.py [--quick]

MLP 64-256-256-10, three seeds, the same number of updates for every arm: dense training,
then either GMP over the second half or one-shot pruning at the midpoint followed by fine-tuning.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from compress_callbacks import CompressionManager, GradualMagnitudePruning
from compress_callbacks.pruning.masks import unstructured_keep_masks


def data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


def model():
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def run(arm: str, sparsity: float, seed: int, steps: int, batch: int = 64) -> float:
    xtr, ytr, xte, yte = data()
    torch.manual_seed(seed)
    net = model()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    half = steps // 2
    if arm.startswith("gmp"):
        scope = "global" if arm.endswith("global") else "layer"
        gmp = GradualMagnitudePruning(sparsity, start_step=steps // 4, end_step=int(steps * 0.75),
                                      update_every=max(1, steps // 40), scope=scope)
        CompressionManager(gmp).attach(net, optimizer)
    keeps = None
    for step in range(steps):
        if arm == "one-shot" and step == half:
            ws = [m.weight for m in net if isinstance(m, nn.Linear)]
            keeps = unstructured_keep_masks([w.detach() for w in ws], sparsity)
            with torch.no_grad():
                for w, k in zip(ws, keeps):
                    w.mul_(k)
        idx = torch.randint(0, len(xtr), (batch,), generator=g)
        loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
        loss.backward()
        if keeps is not None:
            for w, k in zip(ws, keeps):
                w.grad.mul_(k)
        optimizer.step()
        optimizer.zero_grad()
        if keeps is not None:
            with torch.no_grad():
                for w, k in zip(ws, keeps):
                    w.mul_(k)
    net.eval()
    with torch.no_grad():
        return float((net(xte).argmax(1) == yte).float().mean()) * 100


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = 600 if args.quick else 3000
    seeds = [0] if args.quick else [0, 1, 2]
    rows = [("dense", 0.0)] + [(arm, s) for s in (0.9, 0.98) for arm in ("one-shot", "gmp-layer", "gmp-global")]
    lines = [f"Digits accuracy (%), MLP 64-256-256-10, {steps} updates, seeds {seeds}"]
    lines.append(f"{'arm':12s}{'sparsity':>10s}{'mean':>8s}   per seed")
    for arm, s in rows:
        accs = [run(arm if s else "dense", s, seed, steps) for seed in seeds]
        lines.append(f"{arm:12s}{s:>10.2f}{sum(accs) / len(accs):>8.2f}   " + " ".join(f"{a:.2f}" for a in accs))
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
