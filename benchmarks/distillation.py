"""Cost of DistillationLoss: step time against a plain step plus the teacher's forward, and peak memory.

(1) Time, interleaved in one process (medians over rounds):
    plain   = student forward + cross-entropy + backward + optimizer step
    base    = plain + the teacher's forward under no_grad (what any KD step must pay)
    kd      = the same step with ``DistillationLoss(teacher)(logits, y, inputs=x)``
    hand    = the same step with a hand-written KD loss (teacher forward + F.kl_div batchmean + CE)
    machinery overhead = (kd - base) / plain          (target: at most 3 %)

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
    for r in range(rounds):
        order = list(variants.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            start = time.perf_counter()
            for _ in range(steps):
                fn()
                optimizer.step()
                optimizer.zero_grad()
            times[name].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


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
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (< 60 s)")
    args = parser.parse_args(argv)
    if args.quick:
        sizes = dict(batch=128, features=128, student_hidden=256, teacher_hidden=1024, classes=100, steps=10, rounds=5)
        rows, vocab = 512, 8000
    else:
        sizes = dict(batch=256, features=512, student_hidden=1024, teacher_hidden=2048, classes=1000, steps=20, rounds=15)
        rows, vocab = 4096, 32000
    t = time_steps(**sizes)
    lines = [
        f"(1) step time, {sizes['batch']}x{sizes['features']} batch, student hidden {sizes['student_hidden']}, "
        f"teacher hidden {sizes['teacher_hidden']}, {sizes['classes']} classes, medians of {sizes['rounds']} interleaved rounds",
        f"  plain student step            {1e3 * t['plain']:8.2f} ms",
        f"  + teacher forward (base)      {1e3 * t['base']:8.2f} ms",
        f"  DistillationLoss step         {1e3 * t['kd']:8.2f} ms",
        f"  hand-written KD step          {1e3 * t['hand']:8.2f} ms",
        f"  DistillationLoss machinery: (kd - base) / plain = {100 * (t['kd'] - t['base']) / t['plain']:+.1f} %  (target <= 3 %)",
        f"  hand-written KD machinery:  (hand - base) / plain = {100 * (t['hand'] - t['base']) / t['plain']:+.1f} %",
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
