"""Training-step time with compression attached, eager and under ``torch.compile(model)``, in one process.

Models (as in ``qat_overhead.py``): an MLP 1024-2048-1024-512-10 at batch 64 and a small CNN with
BatchNorm (3 conv+BN+ReLU blocks, 32x32 inputs) at batch 32; SGD with momentum. Variants: plain,
``GradualMagnitudePruning`` (90 % sparse, reached during warm-up), ``QuantizationAwareTraining`` W8A8
(active from step 0), both, and ``DistillationLoss`` with a teacher of the student's architecture
(compiled too in the compiled arm; the loss itself runs eagerly). Each variant runs eager and with
``torch.compile(model)`` (Inductor); every arm is warmed up (compilation and the schedule's first
switches happen there), then timed in rounds, in a freshly shuffled order each round. A figure is
the median over rounds of an arm's time per step, or of the ratio to another arm timed in the same
round (pairing within a round cancels the drifts of a shared machine). Recompilations during the
timed rounds are counted: there should be none.

Targets (issue 19): compiled with GMP <= 1.1x the compiled plain step, with QAT <= 1.3x, and a
compiled step never slower than the eager one.

Run: ``PYTHONPATH=. python benchmarks/compile.py`` (``--quick`` for a small smoke run).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from compress_callbacks import CompressionManager, DistillationLoss, GradualMagnitudePruning, QuantizationAwareTraining
from qat_overhead import make_cnn, make_mlp  # the same models as the QAT overhead benchmark (benchmarks/ is on sys.path)

VARIANTS = ("plain", "GMP", "QAT", "GMP+QAT", "KD")
TARGETS = {"GMP": 1.1, "QAT": 1.3, "GMP+QAT": None, "KD": None}


def build_arm(make: Callable[[], nn.Module], variant: str, compiled: bool, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step of ``variant`` (a closure over its own model, optimizer and callbacks)."""
    torch.manual_seed(0)
    model = make().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    callbacks = []
    if "GMP" in variant:
        callbacks.append(GradualMagnitudePruning(target_sparsity=0.9, start_step=0, end_step=2, update_every=1))
    if "QAT" in variant:
        callbacks.append(QuantizationAwareTraining(start_step=0))
    if callbacks:
        CompressionManager(*callbacks).attach(model, optimizer)
    student = torch.compile(model) if compiled else model
    if variant == "KD":
        teacher = make().eval()
        distill = DistillationLoss(torch.compile(teacher) if compiled else teacher, temperature=4.0, alpha=0.9)
        loss_of = lambda: distill(student(x), y, inputs=x)  # noqa: E731
    else:
        loss_of = lambda: F.cross_entropy(student(x), y)  # noqa: E731

    def step() -> None:
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_arms(arms: dict[tuple[str, str], Callable[[], None]], steps: int, rounds: int, warmup: int, seed: int = 0):
    """Per arm: the seconds per step of each round, and the recompilations seen while timing."""
    for step in arms.values():
        for _ in range(warmup):
            step()
    graphs_before = counters["stats"]["unique_graphs"]
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in arms}
    order = list(arms)
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for key in order:
            start = time.perf_counter()
            for _ in range(steps):
                arms[key]()
            samples[key].append((time.perf_counter() - start) / steps)
    return samples, counters["stats"]["unique_graphs"] - graphs_before


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def table(title: str, samples: dict[tuple[str, str], list[float]], recompiled: int) -> str:
    lines = [
        title,
        "| variant | eager ms | compiled ms | compiled / eager | compiled / plain compiled (target) | eager / plain eager |",
        "|---|---|---|---|---|---|",
    ]
    plain_eager, plain_compiled = samples[("plain", "eager")], samples[("plain", "compiled")]
    for variant in VARIANTS:
        eager, compiled = samples[(variant, "eager")], samples[(variant, "compiled")]
        target = TARGETS.get(variant)
        vs_plain = median_ratio(compiled, plain_compiled)
        verdict = "" if target is None else f" (<= {target}: {'met' if vs_plain <= target else 'NOT met'})"
        lines.append(
            f"| {variant} | {statistics.median(eager) * 1e3:.1f} | {statistics.median(compiled) * 1e3:.1f} | "
            f"{median_ratio(compiled, eager):.2f}x | {vs_plain:.2f}x{verdict} | {median_ratio(eager, plain_eager):.2f}x |"
        )
    lines.append(f"graphs compiled during the timed rounds: {recompiled}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, few rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--only", choices=("mlp", "cnn"), default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 15)
    steps = args.steps or (2 if args.quick else 5)
    warnings.filterwarnings("ignore")
    # ten compiled models share nn.Sequential.forward: more cache entries than Dynamo's default 8
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 512

    if args.quick:
        cases = {
            "mlp": ("MLP 256-512-256-10, batch 16 (--quick)", lambda: make_mlp((256, 512, 256, 10)), (16, 256)),
            "cnn": ("CNN+BN width 8, 16x16, batch 4 (--quick)", lambda: make_cnn(8), (4, 3, 16, 16)),
        }
    else:
        cases = {
            "mlp": ("MLP 1024-2048-1024-512-10, batch 64", make_mlp, (64, 1024)),
            "cnn": ("CNN+BN (3 conv+BN+ReLU blocks, 32x32), batch 32", make_cnn, (32, 3, 32, 32)),
        }
    texts = []
    for key, (title, make, shape) in cases.items():
        if args.only and key != args.only:
            continue
        torch.manual_seed(1)
        x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
        arms = {(v, mode): build_arm(make, v, mode == "compiled", x, y) for v in VARIANTS for mode in ("eager", "compiled")}
        samples, recompiled = time_arms(arms, steps, rounds, warmup=4)
        texts.append(table(f"{title}: time per training step, SGD momentum, {torch.get_num_threads()} threads, "
                           f"median of {rounds} rounds x {steps} steps", samples, recompiled))
        torch._dynamo.reset()
    text = "\n\n".join(texts)
    print(text)
    return text


if __name__ == "__main__":
    main()
