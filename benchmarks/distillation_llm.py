"""Distilling a causal LM: hard labels, full-logit KD, cached top-k KD and each divergence, side by side.

The teacher is a 4-layer Llama-style model pre-trained here on the Python standard library's
sources (``benchmarks/lm_corpus.py``, trained once and cached on disk). Every student has half its
depth (2 layers, same width), starts from the same random initialisation and trains on the same
batches for the same number of steps; only the loss differs:

    hard labels            cross-entropy only
    full KD                DistillationLoss(teacher): the teacher runs every step
    cached top-k KD        DistillationLoss(None) fed entries of cache_teacher_logits(teacher, ..., top_k=k)
                           (k = 16, 64); the teacher never exists in the training process
    reverse KL, JSD        divergence="reverse_kl" / "jsd" (beta 0.5), full logits and cached top-64

Each arm trains in a fresh process, so its memory is its own. Reported per arm: held-out
perplexity (files training never saw), the teacher's compute per training step (a forward pass,
or reading one cache entry), step time, the training process's peak memory above the bare
interpreter with torch imported (RSS high-water mark), whether a teacher is in memory; and the
cache's size on disk per token. Targets: cached top-64 KD within 1 % of full KD's perplexity with
no teacher in memory; the cache at most 0.5 KB per token at k = 64.

    PYTHONPATH=. python benchmarks/distillation_llm.py            # a few minutes on 2 cores (+ the teacher, once)
    PYTHONPATH=. python benchmarks/distillation_llm.py --quick    # tiny budgets (< 60 s plus the quick teacher, once)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.lm_corpus import LMSpec, perplexity, pretrained_lm, random_windows, token_ids, training_record  # noqa: E402

TEMPERATURE, ALPHA = 1.0, 0.5
ARMS = {  # name: (kind, top_k, divergence)
    "hard labels": ("hard", None, None),
    "full KD": ("full", None, "forward_kl"),
    "cached top-16 KD": ("cached", 16, "forward_kl"),
    "cached top-64 KD": ("cached", 64, "forward_kl"),
    "full reverse KL": ("full", None, "reverse_kl"),
    "cached top-64 reverse KL": ("cached", 64, "reverse_kl"),
    "full JSD (beta 0.5)": ("full", None, "jsd"),
    "cached top-64 JSD (beta 0.5)": ("cached", 64, "jsd"),
}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def student_spec(teacher: LMSpec) -> LMSpec:
    """Half the teacher's depth, the same width and vocabulary."""
    return dataclasses.replace(teacher, layers=teacher.layers // 2)


def run_arm(settings: dict) -> dict:
    """Train one student in this (fresh) process and measure it; ``settings`` as written by :func:`main`."""
    torch.set_num_threads(settings["threads"])
    base_rss = _rss_kib("VmRSS")  # the bare interpreter with torch imported
    from transformers import LlamaForCausalLM

    from compress_callbacks import DistillationLoss
    from compress_callbacks.distillation import load_teacher_logits

    teacher_spec = LMSpec(**settings["teacher"])
    kind, top_k, divergence = ARMS[settings["arm"]]
    torch.manual_seed(1234)
    student = LlamaForCausalLM(student_spec(teacher_spec).config())
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    from benchmarks.lm_corpus import cosine_lr

    schedule = cosine_lr(optimizer, settings["steps"])
    batches = random_windows(token_ids("train", teacher_spec.vocab_size), teacher_spec.batch_size, teacher_spec.seq_len,
                             settings["steps"], seed=settings["data_seed"])
    teacher = pretrained_lm(teacher_spec) if kind == "full" else None
    cache = load_teacher_logits(settings["caches"][str(top_k)]) if kind == "cached" else None
    distill = None if kind == "hard" else DistillationLoss(None, temperature=TEMPERATURE, alpha=ALPHA, shift_labels=True,
                                                            divergence=divergence)
    _reset_peak()
    teacher_seconds, step_seconds = [], []
    student.train()
    for step, ids in enumerate(batches):
        start = time.perf_counter()
        outputs = student(input_ids=ids)
        if kind == "hard":
            logits = outputs.logits[:, :-1]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        else:
            teacher_start = time.perf_counter()
            if kind == "full":
                with torch.no_grad():
                    teacher_outputs = teacher(input_ids=ids).logits  # what DistillationLoss(teacher) runs every step
            else:
                teacher_outputs = cache[step]  # the teacher's part: reading one entry
            teacher_seconds.append(time.perf_counter() - teacher_start)
            loss = distill(outputs, ids, inputs=ids, teacher_outputs=teacher_outputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        step_seconds.append(time.perf_counter() - start)
    peak = _rss_kib("VmHWM")
    heldout = token_ids("heldout", teacher_spec.vocab_size)
    return {
        "arm": settings["arm"],
        "perplexity": perplexity(student, heldout, teacher_spec.seq_len, max_windows=settings["eval_windows"]),
        "teacher_ms": 1e3 * statistics.median(teacher_seconds) if teacher_seconds else 0.0,
        "step_ms": 1e3 * statistics.median(step_seconds),
        "peak_mib": (peak - base_rss) / 1024,
        "teacher_in_memory": teacher is not None,
    }


def _run_in_fresh_process(settings: dict) -> dict:
    code = ("import json, sys; sys.path.insert(0, %r); from benchmarks.distillation_llm import run_arm; "
            "print('RESULT ' + json.dumps(run_arm(json.loads(sys.argv[1]))))" % ROOT)
    done = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"arm {settings['arm']!r} failed:\n{done.stderr[-3000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (< 60 s once the quick teacher is cached)")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default 200, quick 20)")
    parser.add_argument("--teacher-steps", type=int, default=None, help="teacher pre-training steps (default 3000, quick 60)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    quick = args.quick
    teacher_spec = LMSpec(seq_len=64, batch_size=16, steps=args.teacher_steps or (60 if quick else 3000), lr=3e-3)
    steps = args.steps or (20 if quick else 200)
    torch.set_num_threads(args.threads)

    cached_teacher = training_record(teacher_spec) is not None
    teacher = pretrained_lm(teacher_spec)
    teacher_seconds = training_record(teacher_spec)["seconds"]
    heldout = token_ids("heldout", teacher_spec.vocab_size)
    eval_windows = 64 if quick else 1024
    teacher_ppl = perplexity(teacher, heldout, teacher_spec.seq_len, max_windows=eval_windows)

    from compress_callbacks.distillation import cache_teacher_logits

    folder = tempfile.mkdtemp(prefix="distill_llm_")
    data_seed = 1
    batches = random_windows(token_ids("train", teacher_spec.vocab_size), teacher_spec.batch_size, teacher_spec.seq_len,
                             steps, seed=data_seed)
    caches, cache_rows = {}, []
    for k in (16, 64):
        path = os.path.join(folder, f"teacher_top{k}.bin")
        start = time.perf_counter()
        cache = cache_teacher_logits(teacher, batches, path, top_k=k, temperature=TEMPERATURE, progress=False)
        cache_rows.append((k, time.perf_counter() - start, cache.bytes_per_position, cache.nbytes))
        caches[str(k)] = path
    del teacher

    settings = {"teacher": dataclasses.asdict(teacher_spec), "steps": steps, "lr": 3e-3, "data_seed": data_seed, "threads": args.threads,
                "caches": caches, "eval_windows": eval_windows}
    results = [_run_in_fresh_process({**settings, "arm": arm}) for arm in ARMS]
    for path in caches.values():
        os.remove(path)
    os.rmdir(folder)

    by_arm = {r["arm"]: r for r in results}
    full, top64 = by_arm["full KD"]["perplexity"], by_arm["cached top-64 KD"]["perplexity"]
    tokens = steps * teacher_spec.batch_size * teacher_spec.seq_len
    lines = [
        f"teacher: Llama {teacher_spec.layers} layers x {teacher_spec.width}, vocabulary {teacher_spec.vocab_size} (BPE on the "
        f"stdlib's sources), {teacher_spec.steps} steps x {teacher_spec.batch_size} x {teacher_spec.seq_len} tokens"
        f" ({'read from the cache, ' if cached_teacher else ''}trained in {teacher_seconds:.0f} s); "
        f"held-out perplexity {teacher_ppl:.2f}",
        f"students: {teacher_spec.layers // 2} layers x {teacher_spec.width}, {steps} steps x {teacher_spec.batch_size} x "
        f"{teacher_spec.seq_len} tokens ({tokens} tokens), AdamW lr 3e-3 cosine, T={TEMPERATURE}, alpha={ALPHA} (soft), "
        f"same init and batches; held-out perplexity over {eval_windows} windows; torch threads {args.threads}",
        f"  {'arm':<30} {'perplexity':>10} {'vs full KD':>10} {'teacher/step':>13} {'step':>9} {'peak MiB':>9}  teacher in memory",
    ]
    for r in results:
        lines.append(f"  {r['arm']:<30} {r['perplexity']:10.3f} {100 * (r['perplexity'] / full - 1):+9.2f}% "
                     f"{r['teacher_ms']:10.1f} ms {r['step_ms']:6.0f} ms {r['peak_mib']:9.0f}  {'yes' if r['teacher_in_memory'] else 'no'}")
    lines.append("  teacher/step: the teacher's forward pass (full KD) or reading one cache entry (cached); peak MiB: the "
                 "training process's RSS high-water mark above the bare interpreter with torch imported")
    for k, seconds, per_position, nbytes in cache_rows:
        lines.append(f"  cache top-{k}: {per_position:.0f} bytes per token on disk ({nbytes / 2**20:.1f} MiB for {tokens} tokens),"
                     f" written in {seconds:.1f} s (one teacher pass over the training batches)")
    per_token_64 = next(per for k, _, per, _ in cache_rows if k == 64)
    lines.append(f"targets: cached top-64 KD within 1 % of full KD: {100 * (top64 / full - 1):+.2f} % "
                 f"({'met' if top64 <= 1.01 * full else 'NOT met'}), no teacher in memory: "
                 f"{'met' if not by_arm['cached top-64 KD']['teacher_in_memory'] else 'NOT met'}; cache <= 512 bytes per token at "
                 f"k=64: {per_token_64:.0f} ({'met' if per_token_64 <= 512 else 'NOT met'})")
    if quick:
        lines.append("(--quick: a barely trained teacher and 20 steps; the targets are meant for the full run)")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
