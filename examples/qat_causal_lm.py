"""Quantization-aware fine-tuning of a causal language model in a plain Accelerate loop, out as a torchao model.

1. takes a small Llama-style model pre-trained here on the Python standard library's sources
   (``benchmarks/lm_corpus.py``: its tokenizer and weights are trained on the first run, about 4
   minutes on 2 cores, then read from ``~/.cache/compress_callbacks/lm_corpus``; nothing is downloaded);
2. fine-tunes it in an Accelerate loop with ``QuantizationAwareTraining`` in the "8da4w" scheme that
   ExecuTorch's XNNPACK backend and torchao run: int4 weights in groups (one scale per 16 inputs),
   int8 activations quantized per token at run time; the LM head stays in float;
3. finalizes it, converts it with ``to_torchao`` (torchao tensors holding the trained int4 codes),
   compares held-out perplexity with the fp32 model and with post-training quantization of it,
   generates a few tokens and saves it with ``save_pretrained`` (``from_pretrained`` reloads it).

    python examples/qat_causal_lm.py                 # about 25 s on 2 cores once the base model is cached
    python examples/qat_causal_lm.py --steps 20      # a quick run
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from benchmarks.lm_corpus import LMSpec, cosine_lr, load_tokenizer, perplexity, pretrained_lm, random_windows, token_ids  # noqa: E402
from compress_callbacks import CompressionManager, QuantizationAwareTraining  # noqa: E402
from compress_callbacks.export import to_torchao  # noqa: E402

GROUP = 16  # the model's MLP width (336) is a multiple of 16, not of 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning updates (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--eval-windows", type=int, default=256, help="held-out windows of 64 tokens (default: %(default)s)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/qat_causal_lm"), help="(default: %(default)s)")
    return parser.parse_args(argv)


def post_training_8da4w(model: torch.nn.Module) -> torch.nn.Module:
    """torchao's post-training quantization to the same scheme (the baseline QAT should beat)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, PerGroup, quantize_

    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(GROUP)),
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and name != "lm_head")
    return quantized


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    spec = LMSpec(seq_len=64)  # 4 layers x 128, vocabulary 2048, pre-trained 3000 steps of 16 x 64 tokens
    base = pretrained_lm(spec)
    heldout = token_ids("heldout", spec.vocab_size)

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, heldout, spec.seq_len, max_windows=args.eval_windows)

    accelerator = Accelerator()
    model = copy.deepcopy(base).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    schedule = cosine_lr(optimizer, args.steps)
    batches = random_windows(token_ids("train", spec.vocab_size), spec.batch_size, spec.seq_len, args.steps, seed=7)
    model, optimizer = accelerator.prepare(model, optimizer)
    # --- the lines added to the loop -------------------------------------------------------------
    qat = QuantizationAwareTraining(start_step=0, weight_bits=4, weight_group_size=GROUP, activation_scheme="dynamic",
                                    exclude=["lm_head"])
    manager = CompressionManager(qat, accelerator=accelerator)
    manager.attach(model, optimizer)
    # ----------------------------------------------------------------------------------------------
    for step, ids in enumerate(batches):
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps}: loss {loss.item():.3f}", flush=True)
    compressed = manager.finalize(accelerator.unwrap_model(model))  # plain modules, weights on the int4 grid
    quantized = to_torchao(compressed)                                # torchao tensors holding the trained codes

    results = {"fp32 (the pre-trained model)": ppl(base), "post-training 8da4w (torchao)": ppl(post_training_8da4w(base)),
               "QAT 8da4w, to_torchao": ppl(quantized)}
    print(f"\nheld-out perplexity ({args.eval_windows} windows of {spec.seq_len} tokens from files training never saw):")
    for name, value in results.items():
        print(f"  {name:<32} {value:8.2f}")

    tokenizer = load_tokenizer(spec.vocab_size)
    prompt = torch.tensor([tokenizer.encode("def read_config(path):\n    ").ids])
    with torch.no_grad():
        generated = quantized.generate(prompt, max_new_tokens=24, do_sample=False)
    print("\ngreedy continuation by the int4 model:\n" + tokenizer.decode(generated[0].tolist()))

    args.output_dir.mkdir(parents=True, exist_ok=True)
    quantized.save_pretrained(args.output_dir)  # reload: LlamaForCausalLM.from_pretrained(args.output_dir)
    size = sum(f.stat().st_size for f in args.output_dir.glob("*.safetensors"))
    print(f"\nwrote {args.output_dir} ({size / 2**20:.2f} MiB of safetensors)")
    return results


if __name__ == "__main__":
    main()
