"""Training-step overhead of QAT versus a plain step, interleaved in one process.

Models: an MLP 1024-2048-1024-512-10 (about 4.7M parameters) at batch 64 and 256, and a small CNN
with BatchNorm (3 conv+BN+ReLU blocks, 32x32 inputs, batch 32). Optimizer: SGD with momentum.
Variants: a plain step; ``QuantizationAwareTraining`` W8A8 and weight-only (W8); torchao's QAT
(``torchao.quantization.qat``, Linear only: int8 per-token activations + int8 per-channel weights,
and weight-only) and the deprecated ``torch.ao.quantization.prepare_qat`` (fbgemm W8A8) as named
baselines. Every variant is timed in rounds, in a freshly shuffled order each round; a variant's
figure is the median over rounds of (its step time / the plain step's in the same round), with the
quartiles: pairing within a round cancels slow drifts of a shared machine.

Run: ``PYTHONPATH=. python benchmarks/qat_overhead.py`` (``--quick`` for a < 60 s smoke run).
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

from compress_callbacks import CompressionManager, QuantizationAwareTraining


def make_mlp(sizes=(1024, 2048, 1024, 512, 10)) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def make_cnn(width: int = 32) -> nn.Module:
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, width, 1), *block(width, 2 * width, 2), *block(2 * width, 4 * width, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
    )


def ours(model, optimizer, **kwargs):
    manager = CompressionManager(QuantizationAwareTraining(start_step=0, **kwargs))
    manager.attach(model, optimizer)
    return manager


def torchao_qat(model, weight_only: bool):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel")
    act = None if weight_only else IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))


def torch_ao_prepare_qat(model, cnn: bool):
    import torch.ao.quantization as tq

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.quant, self.inner, self.dequant = tq.QuantStub(), inner, tq.DeQuantStub()

        def forward(self, x):
            return self.dequant(self.inner(self.quant(x)))

    wrapped = Wrapped(model)
    wrapped.qconfig = tq.get_default_qat_qconfig("fbgemm")
    if cnn:
        groups = [[f"inner.{i}", f"inner.{i + 1}", f"inner.{i + 2}"] for i in (0, 3, 6)]
        wrapped.train()
        wrapped = tq.fuse_modules_qat(wrapped, groups)
    return tq.prepare_qat(wrapped.train())


def build_variants(kind: str, base: nn.Module) -> dict[str, tuple[nn.Module, torch.optim.Optimizer, object]]:
    """name -> (model, optimizer, handle to keep alive), each model a fresh deep copy of ``base``."""
    variants = {}

    def add(name: str, prepare: Callable, before_optimizer: bool) -> None:
        model, handle = copy.deepcopy(base).train(), None
        if before_optimizer:  # module swaps that create new parameters: the optimizer comes after
            model = prepare(model, None) or model
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if not before_optimizer:
            handle = prepare(model, optimizer)
        variants[name] = (model, optimizer, handle)

    add("plain", lambda m, o: None, False)
    add("ours W8A8", lambda m, o: ours(m, o), False)
    add("ours W8 weight-only", lambda m, o: ours(m, o, activation_bits=None), False)
    if kind == "mlp":
        add("torchao QAT W8A8", lambda m, o: torchao_qat(m, weight_only=False), True)
        add("torchao QAT weight-only", lambda m, o: torchao_qat(m, weight_only=True), True)
    add("torch.ao prepare_qat W8A8", lambda m, o: torch_ao_prepare_qat(m, cnn=kind == "cnn"), True)
    return variants


def time_variants(variants, x, y, steps: int, rounds: int, seed: int = 0) -> dict[str, tuple[float, float, float, float]]:
    """Per variant: (median, q1, q3) of the per-round ratio to the plain step, and its median seconds per step."""
    loss_fn = nn.CrossEntropyLoss()
    names = list(variants)

    def run(name, n):
        model, optimizer, _ = variants[name]
        for _ in range(n):
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for name in names:  # warm-up
        run(name, 2)
    samples: dict[str, list[float]] = {n: [] for n in names}
    order = list(names)
    shuffle = random.Random(seed).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            run(name, steps)
            samples[name].append((time.perf_counter() - start) / steps)
    out = {}
    for name, times in samples.items():
        ratios = [t / p for t, p in zip(times, samples["plain"])]
        q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        out[name] = (median, q1, q3, statistics.median(times))
    return out


def format_table(title: str, results: dict[str, dict[str, float]]) -> str:
    columns = list(results)
    names = list(next(iter(results.values())))
    lines = [title, "| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names:
        cells = []
        for col in columns:
            r = results[col].get(name)
            cells.append("-" if r is None else f"{r[0]:.2f}x [{r[1]:.2f}-{r[2]:.2f}] ({r[3] * 1e3:.1f} ms)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, small steps (< 60 s)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 30)
    steps = args.steps or (2 if args.quick else 5)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")

    mlp = make_mlp()
    mlp_results = {}
    for batch in (64, 256):
        x, y = torch.randn(batch, 1024), torch.randint(0, 10, (batch,))
        mlp_results[f"MLP b{batch}"] = time_variants(build_variants("mlp", mlp), x, y, steps, rounds)
    cnn = make_cnn()
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    cnn_results = {"CNN+BN b32": time_variants(build_variants("cnn", cnn), x, y, steps, rounds)}

    n_params = sum(p.numel() for p in mlp.parameters())
    text = "\n\n".join(
        [
            format_table(f"QAT step time / plain step (MLP {n_params / 1e6:.2f}M params, SGD momentum, "
                         f"{torch.get_num_threads()} threads)", mlp_results),
            format_table("QAT step time / plain step (small CNN with BatchNorm)", cnn_results),
        ]
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
