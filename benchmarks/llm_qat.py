"""Quantization-aware fine-tuning of a causal LM: 8da4w and int4 weight-only, against PTQ and torchao's QAT.

The base model is the Llama-style LM of ``benchmarks/lm_corpus.py``, pre-trained here on the Python
standard library's sources (trained once and cached on disk; the distillation benchmark shares it).
Every arm starts from it and fine-tunes on the same batches for the same number of steps:

    fp32 fine-tune          the control: plain next-token training
    PTQ 8da4w / int4 WO     torchao ``quantize_`` of the fp32 fine-tune (Int8DynamicActivationIntxWeightConfig /
                            IntxWeightOnlyConfig, int4 weights in groups of 32, or 16 for the small model whose
                            MLP width, 336, is not a multiple of 32): the post-training baseline
    ours 8da4w / int4 WO    QuantizationAwareTraining(weight_bits=4, weight_group_size=32, activation_scheme=...),
                            with and without learn_scales, finalized and converted by to_torchao
    torchao QAT             torchao's QATConfig(base_config, step="prepare") ... step="convert", same base configs

The LM head stays in float in every arm (the field's default: it carries most of a 4-bit model's loss).
Reported: held-out perplexity (files training never saw) and the share of the PTQ gap each QAT arm
recovers, ``(ppl_PTQ - ppl_QAT) / (ppl_PTQ - ppl_fp32)``; the training step of each QAT against a plain
step, in one process; the ``to_torchao`` model's greedy decoding speed and file size against fp32, both
compiled. Targets: our 8da4w QAT recovers at least 60 % of the PTQ gap and at least as much as torchao's
QAT; our fake-quant step at most torchao's ratio and at most 1.3x a plain step.

    PYTHONPATH=. python benchmarks/llm_qat.py            # about 10 minutes on 2 idle cores (+ the base model, once)
    PYTHONPATH=. python benchmarks/llm_qat.py --size 12m # the 12.2M-parameter base (pre-training it: ~30 min)
    PYTHONPATH=. python benchmarks/llm_qat.py --quick    # tiny budgets (a barely trained model; < 2 minutes once cached)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.lm_corpus import LMSpec, perplexity, pretrained_lm, random_windows, token_ids, train_lm, training_record  # noqa: E402

SIZES = {  # --size: the base model (LMSpec arguments); both pre-train 3000 steps x 16 x 64 tokens
    "small": dict(layers=4, width=128, heads=4),  # 1.30M parameters; MLP width 336 (groups of 16)
    "12m": dict(layers=6, width=384, heads=6),  # 12.2M parameters; MLP width 1024 (groups of 32)
}


def group_size(spec: LMSpec) -> int:
    """32 (the field's default group), or 16 where the MLP width is not a multiple of 32."""
    config = spec.config()
    return 32 if config.intermediate_size % 32 == 0 and config.hidden_size % 32 == 0 else 16


def our_arms(group: int) -> dict[str, dict]:
    """arm: QuantizationAwareTraining keyword arguments (the LM head is left out in every arm)."""
    return {
        "ours 8da4w": dict(weight_bits=4, weight_group_size=group, activation_scheme="dynamic"),
        "ours 8da4w + learn_scales": dict(weight_bits=4, weight_group_size=group, activation_scheme="dynamic", learn_scales=True),
        "ours int4 WO": dict(weight_bits=4, weight_group_size=group, activation_bits=None),
        "ours int4 WO + learn_scales": dict(weight_bits=4, weight_group_size=group, activation_bits=None, learn_scales=True),
    }


def base_configs(group: int) -> dict[str, object]:
    """torchao's configs of the two schemes (the PTQ and torchao-QAT arms)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, PerGroup

    return {
        "8da4w": Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group)),
        "int4 WO": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)),
    }


def _not_head(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and name != "lm_head"


def fine_tune(model, batches, lr, step_hook=None) -> list[float]:
    """``lm_corpus.train_lm`` without weight decay; returns the step times (s). ``step_hook(optimizer)``
    runs once before training (a QAT attaches itself there)."""
    seconds: list[float] = []
    train_lm(model, batches, lr, weight_decay=0.0, on_optimizer=step_hook, step_seconds=seconds)
    return seconds


def ours(base, batches, lr, kwargs):
    """Our QAT arm: fine-tune under QuantizationAwareTraining, finalize, convert with to_torchao."""
    from compress_callbacks import CompressionManager, QuantizationAwareTraining
    from compress_callbacks.export import to_torchao

    model = copy.deepcopy(base)
    manager = CompressionManager(QuantizationAwareTraining(start_step=0, exclude=["lm_head"], **kwargs))
    seconds = fine_tune(model, batches, lr, step_hook=lambda optimizer: manager.attach(model, optimizer))
    return to_torchao(manager.finalize(model)).eval(), seconds


def torchao_qat(base, batches, lr, config):
    """torchao's own QAT with the same base config: prepare, fine-tune, convert."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    model = copy.deepcopy(base)
    quantize_(model, QATConfig(config, step="prepare"), filter_fn=_not_head)
    seconds = fine_tune(model, batches, lr)
    quantize_(model, QATConfig(config, step="convert"), filter_fn=_not_head)
    return model.eval(), seconds


def ptq(model, config):
    from torchao.quantization import quantize_

    quantized = copy.deepcopy(model)
    quantize_(quantized, config, filter_fn=_not_head)
    return quantized.eval()


def step_ratio(base, batches, lr, make, rounds) -> float:
    """Median step time of ``make``'s training over a plain step's, interleaved in this process."""
    ratios = []
    for _ in range(rounds):
        plain = statistics.median(fine_tune(copy.deepcopy(base), batches, lr)[1:])
        quantized = statistics.median(make()[1:])
        ratios.append(quantized / plain)
    return statistics.median(ratios)


def decode_tokens_per_second(model, prompt, new_tokens, rounds) -> float:
    compiled = torch.compile(model.forward)
    model.forward = compiled
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False)  # compile
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
            times.append(time.perf_counter() - start)
    return new_tokens / statistics.median(times)


def file_bytes(model) -> int:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budgets (a barely trained base model, 10 steps)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per arm (default 300, quick 10)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--size", choices=sorted(SIZES), default="small",
                        help="the base model: small (1.3M parameters, ~4 min to pre-train) or 12m (12.2M, ~30 min)")
    args = parser.parse_args(argv)
    quick = args.quick
    torch.set_num_threads(args.threads)
    spec = LMSpec(seq_len=64, batch_size=16, steps=60 if quick else 3000, lr=3e-3, **SIZES[args.size])
    group = group_size(spec)
    arms = our_arms(group)
    steps = args.steps or (10 if quick else 300)
    lr = 3e-4
    eval_windows = 32 if quick else 512

    cached = training_record(spec) is not None
    base = pretrained_lm(spec)
    params = sum(p.numel() for p in base.parameters())
    heldout = token_ids("heldout", spec.vocab_size)
    batches = random_windows(token_ids("train", spec.vocab_size), spec.batch_size, spec.seq_len, steps, seed=7)

    def ppl(model) -> float:
        return perplexity(model, heldout, spec.seq_len, max_windows=eval_windows)

    results: dict[str, float] = {"base model (no fine-tune)": ppl(base)}
    fp32 = copy.deepcopy(base)
    fp32_seconds = fine_tune(fp32, batches, lr)
    fp32.eval()
    results["fp32 fine-tune"] = ppl(fp32)
    configs = base_configs(group)
    for scheme, config in configs.items():
        results[f"PTQ {scheme}"] = ppl(ptq(fp32, config))
    step_ms = {"plain": 1e3 * statistics.median(fp32_seconds[1:])}
    converted = {}
    for arm, kwargs in arms.items():
        model, seconds = ours(base, batches, lr, kwargs)
        results[arm], step_ms[arm] = ppl(model), 1e3 * statistics.median(seconds[1:])
        converted[arm] = model
    for scheme, config in configs.items():
        model, seconds = torchao_qat(base, batches, lr, config)
        results[f"torchao QAT {scheme}"], step_ms[f"torchao QAT {scheme}"] = ppl(model), 1e3 * statistics.median(seconds[1:])

    # training-step cost, interleaved rounds on a short slice (the arms' own medians above are load-sensitive)
    rounds, slice_ = (1, batches[:4]) if quick else (3, batches[:12])
    ratio_ours = step_ratio(base, slice_, lr, lambda: ours(base, slice_, lr, arms["ours 8da4w"])[1], rounds)
    ratio_torchao = step_ratio(base, slice_, lr, lambda: torchao_qat(base, slice_, lr, configs["8da4w"])[1], rounds)

    # inference: file size, then greedy decoding, compiled, batch 1
    fp32_bytes, int4_bytes = file_bytes(fp32), file_bytes(converted["ours 8da4w"])
    prompt = heldout[: spec.seq_len // 2].view(1, -1)
    new_tokens = 8 if quick else 32
    fp32_tps = decode_tokens_per_second(copy.deepcopy(fp32), prompt, new_tokens, 2 if quick else 5)
    int4_tps = decode_tokens_per_second(converted["ours 8da4w"], prompt, new_tokens, 2 if quick else 5)

    fp, lines = results["fp32 fine-tune"], []
    lines.append(f"base: Llama {spec.layers} layers x {spec.width}, {params / 1e6:.2f}M parameters, vocabulary {spec.vocab_size} "
                 f"(BPE on the stdlib's sources), pre-trained {spec.steps} steps x {spec.batch_size} x {spec.seq_len} tokens"
                 f"{' (read from the cache)' if cached else ''}; fine-tune: {steps} steps x {spec.batch_size} x {spec.seq_len} "
                 f"tokens, AdamW lr {lr} cosine, the same batches in every arm; int4 groups of {group}; torch threads {args.threads}")
    lines.append(f"  {'arm':<30} {'held-out ppl':>12} {'PTQ gap recovered':>18} {'step':>9}")
    for arm, value in results.items():
        scheme = "8da4w" if "8da4w" in arm else "int4 WO" if "int4 WO" in arm else None
        recovered = ""
        if scheme is not None and not arm.startswith("PTQ"):
            gap = results[f"PTQ {scheme}"] - fp
            recovered = f"{100 * (results[f'PTQ {scheme}'] - value) / gap:17.1f}%" if gap > 0 else f"{'(no gap)':>18}"
        ms = step_ms.get("plain" if arm == "fp32 fine-tune" else arm)
        lines.append(f"  {arm:<30} {value:12.3f} {recovered:>18} {f'{ms:.0f} ms' if ms else '':>9}")
    gap = results["PTQ 8da4w"] - fp
    ours_share = (results["PTQ 8da4w"] - results["ours 8da4w"]) / gap if gap > 0 else float("nan")
    ao_share = (results["PTQ 8da4w"] - results["torchao QAT 8da4w"]) / gap if gap > 0 else float("nan")
    lines.append(f"  training step / plain step (8da4w, interleaved): ours {ratio_ours:.2f}x, torchao QAT {ratio_torchao:.2f}x")
    lines.append(f"  greedy decoding, batch 1, torch.compile: fp32 {fp32_tps:.0f} tokens/s, to_torchao 8da4w {int4_tps:.0f} tokens/s "
                 f"({int4_tps / fp32_tps:.2f}x); safetensors file {int4_bytes / 2**20:.2f} MiB vs fp32 {fp32_bytes / 2**20:.2f} MiB "
                 f"({int4_bytes / fp32_bytes:.2f}x)")
    lines.append(f"targets: our 8da4w recovers >= 60 % of the PTQ gap: {100 * ours_share:.1f} % "
                 f"({'met' if ours_share >= 0.6 else 'NOT met'}), and >= torchao QAT's {100 * ao_share:.1f} % "
                 f"({'met' if ours_share >= ao_share else 'NOT met'}); step ratio <= torchao's and <= 1.3x: {ratio_ours:.2f}x "
                 f"({'met' if ratio_ours <= min(1.3, ratio_torchao) else 'NOT met'})")
    if quick:
        lines.append("(--quick: a barely trained base model and 10 steps; the targets are meant for the full run)")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
