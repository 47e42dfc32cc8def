"""Cost of DistillationLoss: step time against a plain step plus the teacher's forward, and peak memory.

(1) Time, interleaved in one process (medians over rounds):
    plain   = student forward + cross-entropy + backward + optimizer step
    base    = plain + the teacher's forward under no_grad (what any KD step must pay)
    kd      = the same step with ``DistillationLoss(teacher)(logits, y, inputs=x)``
    hand    = the same step with a hand-written KD loss (teacher forward + F.kl_div batchmean + CE)
    machinery overhead = (kd - base) / plain          (target: at most 3 %)
    wrapper overhead   = (kd - hand) / plain          (what the wrapper adds over writing the loss by hand)
    Whole steps vary by several percent from step to step on a shared machine, so the same
    machinery is also measured precisely in parts (``time_machinery``): the loss's forward +
    backward on the step's logits minus the plain cross-entropy's, plus the wrapper's teacher-call
    overhead, over the plain step's median time.

(2) Peak memory of the token-level loss at V=32,000 and B*T=4,096 (float32 logits, 524 MB each):
    every variant runs in a fresh subprocess that allocates student and teacher logits, resets the
    kernel's resident-set high-water mark (``/proc/self/clear_refs`` = 5; ``ru_maxrss`` where that is
    not allowed) and reads ``VmHWM`` after forward + backward. The figure is the peak growth above
    the logits, which includes the gradient of the student logits (``B*T*V`` floats) that every loss
    produces; "beyond the gradient" subtracts it.

    PYTHONPATH=. python benchmarks/distillation.py            # full
    PYTHONPATH=. python benchmarks/distillation.py --quick    # small sizes (< 60 s)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from compress_callbacks import DistillationLoss  # noqa: E402
from compress_callbacks.distillation import token_kd_losses  # noqa: E402


# ---------------------------------------------------------------------------- (1) time
def mlp(width_in: int, hidden: int, classes: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def time_steps(*, batch: int, features: int, student_hidden: int, teacher_hidden: int, classes: int,
               steps: int, rounds: int, temperature: float = 4.0, alpha: float = 0.9) -> dict[str, float]:
    torch.manual_seed(0)
    student, teacher = mlp(features, student_hidden, classes), mlp(features, teacher_hidden, classes)
    teacher.eval().requires_grad_(False)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
    distill = DistillationLoss(teacher, temperature=temperature, alpha=alpha)
    x, y = torch.randn(batch, features), torch.randint(0, classes, (batch,))

    def plain():
        F.cross_entropy(student(x), y).backward()

    def base():
        with torch.no_grad():
            teacher(x)
        F.cross_entropy(student(x), y).backward()

    def kd():
        distill(student(x), y, inputs=x).backward()

    def hand():
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                        reduction="batchmean", log_target=True) * temperature**2
        (alpha * soft + (1 - alpha) * F.cross_entropy(s, y)).backward()

    variants = {"plain": plain, "base": base, "kd": kd, "hand": hand}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        for _ in range(3):
            fn()
            optimizer.step()
            optimizer.zero_grad()
    order = list(variants)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(steps):
                fn()
                optimizer.step()
                optimizer.zero_grad()
            times[name].append((time.perf_counter() - start) / steps)
    out = {k: statistics.median(v) for k, v in times.items()}
    # per-round differences over the same round's plain step: pairing cancels drifts of a shared machine
    for name, other in (("kd", "base"), ("hand", "base"), ("kd", "hand")):
        per_round = [(a - b) / p for a, b, p in zip(times[name], times[other], times["plain"])]
        q1, median, q3 = statistics.quantiles(per_round, n=4)
        out[f"{name}-{other}"] = (median, q1, q3)
    return out


def _interleaved_medians(variants: dict, rounds: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per call of each function, run once per round in a freshly shuffled order."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants)
    shuffle = random.Random(seed).shuffle
    for fn in variants.values():
        for _ in range(5):
            fn()
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def time_machinery(*, batch: int, features: int, classes: int, rounds: int, temperature: float = 4.0,
                   alpha: float = 0.9, **_) -> dict[str, float]:
    """The KD machinery alone, precisely: everything a KD step adds besides the teacher's forward.

    (a) the loss on the step's logits, forward + backward to the logits: ``DistillationLoss`` (and a
        hand-written KD loss) minus the plain step's cross-entropy;
    (b) running the teacher through the wrapper (device and mode checks, no_grad, autocast, output
        extraction) minus calling it directly under no_grad, with a one-layer teacher so that the
        teacher's own time (which any KD step pays) does not drown the difference.
    Short calls measured thousands of times, interleaved: far less noise than whole steps.
    """
    torch.manual_seed(0)
    logits = torch.randn(batch, classes) * 3
    teacher_logits = torch.randn(batch, classes) * 3
    y = torch.randint(0, classes, (batch,))
    distill = DistillationLoss(None, temperature=temperature, alpha=alpha)

    def leaf():
        return logits.detach().requires_grad_(True)

    def ce():
        F.cross_entropy(leaf(), y).backward()

    def kd():
        distill(leaf(), y, teacher_outputs=teacher_logits).backward()

    def hand():
        s = leaf()
        soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                        reduction="batchmean", log_target=True) * temperature**2
        (alpha * soft + (1 - alpha) * F.cross_entropy(s, y)).backward()

    loss = _interleaved_medians({"ce": ce, "kd": kd, "hand": hand}, rounds)
    small_teacher = nn.Linear(features, 8).eval().requires_grad_(False)
    wrapped = DistillationLoss(small_teacher, temperature=temperature, alpha=alpha)
    x = torch.randn(batch, features)
    like = torch.empty(batch, 8)

    def direct():
        with torch.no_grad():
            small_teacher(x)

    def through_wrapper():
        wrapped.teacher_outputs(x, like)

    teacher = _interleaved_medians({"direct": direct, "wrapper": through_wrapper}, rounds)
    return {"loss_ce": loss["ce"], "loss_kd": loss["kd"], "loss_hand": loss["hand"],
            "teacher_direct": teacher["direct"], "teacher_wrapper": teacher["wrapper"]}


# ---------------------------------------------------------------------------- (2) memory
def _rss_peak_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # ru_maxrss / VmHWM then still hold the setup's peak, which is the logits themselves


def measure_memory(variant: str, rows: int, vocab: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS growth (MiB) of forward + backward of one loss variant."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = torch.randn(rows, vocab, requires_grad=True)
    teacher = torch.randn(rows, vocab)
    targets = torch.randint(0, vocab, (rows,))
    _reset_peak()
    before = _rss_peak_kib()
    if variant == "cross_entropy":
        loss = F.cross_entropy(student, targets)
    elif variant == "hand_kd":
        soft = F.kl_div(F.log_softmax(student / 4, -1), F.log_softmax(teacher / 4, -1), reduction="batchmean", log_target=True) * 16
        loss = 0.9 * soft + 0.1 * F.cross_entropy(student, targets)
    elif variant == "distillation_loss":
        loss = DistillationLoss(None, temperature=4.0, alpha=0.9)(student, targets, teacher_outputs=teacher)
    elif variant == "token_kd_soft_only":
        loss = token_kd_losses(student, teacher, 4.0)[0]
    else:
        raise ValueError(f"unknown variant {variant!r}")
    loss.backward()
    peak = _rss_peak_kib()
    return {"peak_mib": (peak - before) / 1024, "grad_mib": student.numel() * 4 / 2**20}


def memory_table(rows: int, vocab: int) -> list[dict[str, float]]:
    results = []
    for variant in ("cross_entropy", "hand_kd", "distillation_loss", "token_kd_soft_only"):
        code = (
            "import json, sys; sys.path.insert(0, %r); from benchmarks.distillation import measure_memory; "
            "print(json.dumps(measure_memory(%r, %d, %d)))" % (ROOT, variant, rows, vocab)
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
        results.append({"variant": variant, **json.loads(out.stdout.strip().splitlines()[-1])})
    return results


# ---------------------------------------------------------------------------- main
def _pct(stats: tuple[float, float, float]) -> str:
    median, q1, q3 = stats
    return f"{100 * median:+.1f} % [{100 * q1:+.1f} .. {100 * q3:+.1f}]"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 60 s)")
    args = parser.parse_args(argv)
    if args.quick:
        sizes = dict(batch=128, features=128, student_hidden=256, teacher_hidden=1024, classes=100, steps=2, rounds=8)
        rows, vocab = 512, 8000
    else:
        sizes = dict(batch=256, features=512, student_hidden=1024, teacher_hidden=2048, classes=1000, steps=2, rounds=200)
        rows, vocab = 4096, 32000
    t = time_steps(**sizes)
    m = time_machinery(**{**sizes, "rounds": sizes["rounds"] * 25})
    kd_machinery = (m["loss_kd"] - m["loss_ce"] + m["teacher_wrapper"] - m["teacher_direct"]) / t["plain"]
    lines = [
        f"(1) step time, {sizes['batch']}x{sizes['features']} batch, student hidden {sizes['student_hidden']}, "
        f"teacher hidden {sizes['teacher_hidden']}, {sizes['classes']} classes, torch threads {torch.get_num_threads()}, "
        f"medians of {sizes['rounds']} rounds of {sizes['steps']} steps in shuffled order; differences: median [quartiles] "
        "of the per-round difference over the same round's plain step",
        f"  plain student step            {1e3 * t['plain']:8.2f} ms",
        f"  + teacher forward (base)      {1e3 * t['base']:8.2f} ms",
        f"  DistillationLoss step         {1e3 * t['kd']:8.2f} ms",
        f"  hand-written KD step          {1e3 * t['hand']:8.2f} ms",
        f"  DistillationLoss machinery: (kd - base) / plain = {_pct(t['kd-base'])}  (target <= 3 %)",
        f"  hand-written KD machinery:  (hand - base) / plain = {_pct(t['hand-base'])}",
        f"  DistillationLoss vs hand-written: (kd - hand) / plain = {_pct(t['kd-hand'])}",
        f"  the machinery alone, measured precisely ({sizes['rounds'] * 25} interleaved calls each):",
        f"    loss forward + backward on the [{sizes['batch']}, {sizes['classes']}] logits: cross-entropy "
        f"{1e3 * m['loss_ce']:.3f} ms, DistillationLoss {1e3 * m['loss_kd']:.3f} ms, hand-written KD {1e3 * m['loss_hand']:.3f} ms",
        f"    teacher call through the wrapper vs direct: +{1e6 * (m['teacher_wrapper'] - m['teacher_direct']):.0f} us",
        f"    DistillationLoss machinery = (loss - cross-entropy + wrapper) / plain step = {100 * kd_machinery:.1f} %  (target <= 3 %)",
        f"    hand-written KD: (loss - cross-entropy) / plain step = {100 * (m['loss_hand'] - m['loss_ce']) / t['plain']:.1f} %",
        "",
        f"(2) peak memory growth of forward + backward, B*T={rows}, V={vocab}, float32 logits "
        f"({rows * vocab * 4 / 2**20:.0f} MiB each), RSS high-water mark in a fresh process",
        f"  {'loss':<22} {'peak MiB':>9} {'beyond grad':>12} {'vs CE':>7}",
    ]
    table = memory_table(rows, vocab)
    ce_peak = table[0]["peak_mib"]
    for r in table:
        lines.append(
            f"  {r['variant']:<22} {r['peak_mib']:9.0f} {r['peak_mib'] - r['grad_mib']:12.0f} {r['peak_mib'] / ce_peak:7.2f}"
        )
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
