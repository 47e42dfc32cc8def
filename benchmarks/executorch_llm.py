"""ExecuTorch ``.pte`` of a causal LM trained "8da4w": size and full-sequence throughput vs the float program.

A small random Llama (``--layers`` x ``--width``, vocab 2048) is trained a few QAT steps with
``QuantizationAwareTraining(weight_bits=4, weight_group_size=32, activation_scheme="dynamic")`` on
token ids from the Python standard library's sources, finalized and written by ``export_executorch``.
The float program is the same model before QAT lowered by the same route (``torch.export`` of
``model(input_ids, use_cache=False)`` -> ``XnnpackPartitioner``), same symbolic sequence axis.
Throughput: ``ExecuTorchModule`` on one sequence of ``--seq`` tokens (a full-sequence forward, the
prefill), median of interleaved rounds (``int8_inference.time_interleaved``), in one process.

    PYTHONPATH=. python benchmarks/executorch_llm.py               # QAT's default: lm_head at 8 bits (float here)
    PYTHONPATH=. python benchmarks/executorch_llm.py --head-4bit   # lm_head 8da4w too
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import int8_inference as int8_bench  # noqa: E402  (the interleaved timer)


def stdlib_token_ids(vocab: int, count: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """Byte-pair-free token ids: bytes of stdlib sources hashed in pairs into ``vocab`` ids."""
    source = open(os.path.join(os.path.dirname(os.__file__), "argparse.py"), "rb").read()
    data = torch.tensor(list(source), dtype=torch.long)
    ids = (data[:-1] * 256 + data[1:]) % vocab
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (count,), generator=generator)
    return [ids[s : s + length].unsqueeze(0) for s in starts.tolist()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--head-4bit", action="store_true", help="name lm_head in `modules` (QAT keeps it at 8 bits otherwise)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import transformers
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from compress_callbacks import CompressionManager, QuantizationAwareTraining
    from compress_callbacks.export.executorch import ExecuTorchModule, export_executorch
    from compress_callbacks.export.executorch_llm import _dynamic_shapes
    from compress_callbacks.export.onnx_lm import _PositionalCall

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=args.width, intermediate_size=args.width * 4,
                                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    float_model = copy.deepcopy(model).eval()
    batches = stdlib_token_ids(config.vocab_size, args.steps, args.seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)] if args.head_4bit else None
    manager = CompressionManager(QuantizationAwareTraining(start_step=0, weight_bits=4, weight_group_size=32,
                                                           activation_scheme="dynamic", modules=modules))
    manager.attach(model, optimizer)
    for ids in batches:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    finalized = manager.finalize(model)
    example = batches[0]
    directory = tempfile.mkdtemp()
    result = export_executorch(finalized, example, os.path.join(directory, "8da4w.pte"))
    wrapped = _PositionalCall(float_model).eval()
    with torch.no_grad():
        program = torch.export.export(wrapped, (example,), dynamic_shapes=_dynamic_shapes((example,)))
    data = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    float_path = os.path.join(directory, "float.pte")
    with open(float_path, "wb") as f:
        f.write(data)
    programs = {"float .pte": ExecuTorchModule(float_path), "8da4w .pte": ExecuTorchModule(result.path)}
    seconds = int8_bench.time_interleaved({k: (lambda x, p=p: p(x)) for k, p in programs.items()}, example, args.rounds, 0.5)
    print(f"Llama {args.layers} layers x {args.width} wide, vocab {config.vocab_size}, "
          f"{sum(p.numel() for p in float_model.parameters()):,} parameters; one sequence of {args.seq} tokens")
    print(f"8da4w float_layers: {result.float_layers}; max_error vs fake-quant {result.max_error:.4f}, "
          f"argmax agreement {result.argmax_agreement:.3f}")
    print("| program | .pte bytes | tokens/s | vs float |")
    print("|---|---:|---:|---:|")
    sizes = {"float .pte": len(data), "8da4w .pte": result.size_bytes}
    for name in programs:
        print(f"| {name} | {sizes[name]:,} | {args.seq / seconds[name]:,.0f} | "
              f"{sizes[name] / sizes['float .pte']:.3f} size, {seconds['float .pte'] / seconds[name]:.2f}x speed |")


if __name__ == "__main__":
    main()
