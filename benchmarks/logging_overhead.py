"""What logging costs a training step: GMP + QAT with logging off, at the default ``log_every=50`` and at every step.

Model: the MLP 1024-2048-1024-512-10 (about 4.7M parameters) at batch 64, SGD with momentum, with
``GradualMagnitudePruning`` (50 %, reached before timing, so no mask update runs while timed) and
``QuantizationAwareTraining`` (W8A8, active). Variants, each on its own copy of the model:
``log_every=0`` (events only: nothing runs on a timed step), ``log_every=50`` (the default) and
``log_every=1`` (every step measures per-layer sparsity, the weight quantization error and the input
ranges). Timed in rounds, in a freshly shuffled order each round; a figure is the median over rounds of
(the variant's step time / the ``log_every=0`` step time in the same round), with the quartiles. Also
timed in every round: one ``collect_log_values()`` (what a log step adds), as a fraction of that
round's ``log_every=0`` step.

Run: ``PYTHONPATH=. python benchmarks/logging_overhead.py`` (``--quick`` for a < 60 s smoke run).
"""

from __future__ import annotations

import argparse
import copy
import logging
import random
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining


def make_mlp(sizes=(1024, 2048, 1024, 512, 10)) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def build(base: nn.Module, log_every: int):
    model = copy.deepcopy(base)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    manager = CompressionManager(
        GradualMagnitudePruning(0.5, start_step=0, end_step=1, update_every=1),
        QuantizationAwareTraining(start_step=0),
        log_every=log_every,
    )
    manager.attach(model, optimizer)
    return model, optimizer, manager


def step(model, optimizer, x, y) -> None:
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (< 60 s)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=100, help="steps per variant per round (a multiple of 50)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 10)
    logging.getLogger("compress_callbacks").setLevel(logging.WARNING)  # measure the values, not the printing

    torch.manual_seed(0)
    base = make_mlp()
    x, y = torch.randn(64, 1024), torch.randint(0, 10, (64,))
    variants = {f"log_every={n}": build(base, n) for n in (0, 50, 1)}
    for model, optimizer, _ in variants.values():  # past the schedule's end and the first-call costs
        for _ in range(5):
            step(model, optimizer, x, y)

    ratios: dict[str, list[float]] = {name: [] for name in [*variants, "collect"]}
    seconds: dict[str, list[float]] = {name: [] for name in [*variants, "collect"]}
    manager = variants["log_every=0"][2]
    rng = random.Random(0)
    for _ in range(rounds):
        order = [*variants, "collect"]
        rng.shuffle(order)
        times = {}
        for name in order:
            start = time.perf_counter()
            if name == "collect":
                for _ in range(5):
                    values = manager.collect_log_values()
                times[name] = (time.perf_counter() - start) / 5
                continue
            model, optimizer, _ = variants[name]
            for _ in range(args.steps):
                step(model, optimizer, x, y)
            times[name] = (time.perf_counter() - start) / args.steps
        for name in times:
            ratios[name].append(times[name] / times["log_every=0"])
            seconds[name].append(times[name])

    lines = [
        f"MLP 1024-2048-1024-512-10, batch 64, GMP 50% + QAT W8A8, {torch.get_num_threads()} threads, "
        f"{rounds} rounds x {args.steps} steps",
        f"{'variant':<14} {'step ms':>8} {'x events-only (median [q1, q3])':>34}",
    ]
    for name in [*variants, "collect"]:
        q1, median, q3 = statistics.quantiles(ratios[name], n=4) if rounds > 1 else (ratios[name][0],) * 3
        lines.append(f"{name:<14} {1e3 * statistics.median(seconds[name]):8.2f} "
                     f"{median:>16.3f}x [{q1:.3f}, {q3:.3f}]")
    lines.append(f"collect: one collect_log_values() ({len(values)} values), what a log step adds; at log_every=50 "
                 f"that is {statistics.median(ratios['collect']) / 50:.4f} step per step")
    return "\n".join(lines)


if __name__ == "__main__":
    print(main())
