"""Structured pruning made physical: CPU latency of ``shrink``-ed models, Torch-Pruning side by side,
and quality on digits.

    PYTHONPATH=. python benchmarks/structured_pruning.py            # full sizes (a few minutes)
    PYTHONPATH=. python benchmarks/structured_pruning.py --quick    # small sizes, about a minute

Latency. Each model is pruned one-shot with the same group-aware selection that
``GradualMagnitudePruning(granularity="channel" | "head")`` applies (one L2 score per unit of coupled
channels, every family of units at the target), then ``shrink``-ed; dense and shrunk run eager and
under ``torch.compile``, interleaved round by round in one process at the same thread count; the
ratio is dense median / shrunk median (higher is faster). Models: the ResNet-style CNN of
``int8_inference.py`` (width 64, batch 16, 3x32x32) at 50% of channels, an MLP 1024-4096-4096-10
(batch 64) at 50% of hidden neurons, and a BERT-style encoder (random init, 6 layers, hidden 384,
12 heads, FFN 1536, batch 8 x 128 tokens) at 50% of FFN neurons and 25% of heads.

Torch-Pruning (``pip install torch-pruning``, the ``bench`` extra): its ``MagnitudePruner`` (L2)
is given the same masked model at the same ratio, so the channels it should remove are exactly the
zeroed ones: its output is compared with the masked model's (correctness) and its latency with
the dense model's. Failures are recorded as they happen (a tiny Llama with grouped-query attention
is tried too).

Quality. Digits (8x8), a small CNN (conv 32 - conv 64 - linear, BatchNorm), 50% of channels: GMP
with distillation from the dense teacher against one-shot channel pruning (the same selection,
applied at the first update) fine-tuned with cross-entropy, the same number of updates, optimizer
and learning rate; accuracy of the shrunk models on the 25% test split, three seeds.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from compress_callbacks import CompressionManager, DistillationLoss, GradualMagnitudePruning  # noqa: E402
from compress_callbacks.pruning.groups import split_example_inputs  # noqa: E402
from compress_callbacks.export import shrink  # noqa: E402
from compress_callbacks.pruning.structured import GroupSelection  # noqa: E402


# ----------------------------------------------------------------------------------------- models
def make_resnet(width: int) -> nn.Module:
    from int8_inference import make_resnet as resnet

    model = resnet(width)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model


def make_mlp(sizes: tuple[int, ...]) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def make_encoder(layers: int, hidden: int, heads: int, ffn: int) -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                intermediate_size=ffn, vocab_size=1000, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0), add_pooling_layer=False)


def token_inputs(batch: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 1000, (batch, length), generator=g),
            "attention_mask": torch.ones(batch, length, dtype=torch.long)}


# ----------------------------------------------------------------------------------------- pruning
@torch.no_grad()
def prune_one_shot(model: nn.Module, example_inputs, target: float, granularity: str, modules: Callable[[str], bool]) -> None:
    """Mask ``model`` in place the way GMP's selection does at ``target`` (whole units)."""
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and modules(n)]
    selection = GroupSelection(model, names, granularity)
    args, kwargs = split_example_inputs(example_inputs)
    model(*args, **kwargs)  # the first call gives the selection its inputs
    params = dict(model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keeps, owned = selection.select([params[n] for n in names], [None] * len(names), {}, target, "layer")
    for name, keep in list(zip(names, keeps)) + list(owned.items()):
        if keep is not None:
            params[name].mul_(keep.to(params[name].dtype))


def call(model: nn.Module, example_inputs) -> Callable[[], torch.Tensor]:
    args, kwargs = split_example_inputs(example_inputs)

    def run():
        out = model(*args, **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    return run


#: the clock: wall time, or (``--cpu-time``, one thread) the CPU time of the calling thread, which a
#: machine shared with other jobs does not inflate
CLOCK = {"clock": time.perf_counter}


def time_interleaved(paths: dict[str, Callable[[], torch.Tensor]], rounds: int, min_seconds: float) -> dict[str, float]:
    """Median seconds per call of each path; the paths alternate within every round."""
    clock = CLOCK["clock"]
    samples: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        iterations = {}
        for name, fn in paths.items():
            fn()
            start = clock()
            fn()
            iterations[name] = max(1, int(min_seconds / max(clock() - start, 1e-6)))
        for _ in range(rounds):
            for name, fn in paths.items():
                fn()
                start = clock()
                for _ in range(iterations[name]):
                    fn()
                samples[name].append((clock() - start) / iterations[name])
    return {name: statistics.median(values) for name, values in samples.items()}


def torch_pruning(masked: nn.Module, example_inputs, ratio: float, ignored: Callable[[str, nn.Module], bool],
                  heads: Callable[[nn.Module], dict] | None = None, **options):
    """Torch-Pruning's MagnitudePruner (L2) on a copy of the masked model: (pruned model, error text).
    ``ignored`` picks the layers it must leave alone; ``heads`` gives its ``num_heads`` for the copy."""
    try:
        import torch_pruning as tp
    except ImportError:
        return None, "torch-pruning not installed (pip install torch-pruning)"
    model = copy.deepcopy(masked)
    if heads is not None:
        options["num_heads"] = heads(model)
    try:
        pruner = tp.pruner.MagnitudePruner(model, example_inputs, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[m for n, m in model.named_modules() if ignored(n, m)],
                                           **options)
        pruner.step()
        return model, None
    except Exception as err:  # noqa: BLE001 - recorded in the table
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def relative_error(fn: Callable[[], torch.Tensor], reference: torch.Tensor) -> float:
    with torch.no_grad():
        out = fn()
    if out.shape != reference.shape:
        return float("inf")
    return float((out - reference).abs().max() / reference.abs().max())


def latency_rows(quick: bool, rounds: int | None = None, only: str | None = None) -> list[str]:
    width, mlp, enc = (32, (512, 2048, 2048, 10), (2, 192, 6, 768)) if quick else (64, (1024, 4096, 4096, 10), (6, 384, 12, 1536))
    cases = [
        ("ResNet-style CNN, 50% channels", make_resnet(width).eval(), torch.randn(16, 3, 32, 32),
         [("channel", 0.5, lambda n: n != "13")], dict(ratio=0.5, last="13")),
        ("MLP, 50% hidden neurons", make_mlp(mlp).eval(), torch.randn(64, mlp[0]),
         [("channel", 0.5, lambda n: n != "4")], dict(ratio=0.5, last="4")),
        (f"BERT-style encoder ({enc[0]} layers, hidden {enc[1]}), 50% FFN + 25% heads", make_encoder(*enc).eval(),
         token_inputs(8, 64 if quick else 128),
         [("channel", 0.5, lambda n: n.endswith("intermediate.dense")), ("head", 0.25, lambda n: n.endswith(("query", "key", "value")))],
         None),
    ]
    rows = ["| model | shrunk params | eager speed-up | compiled speed-up | shrunk vs masked (max rel. err) "
            "| Torch-Pruning: speed-up (eager) | Torch-Pruning vs masked (max rel. err) |", "|---|---|---|---|---|---|---|"]
    keys = {"cnn": 0, "mlp": 1, "encoder": 2}
    for title, model, inputs, steps, tp_options in cases if only in (None, "gqa") else [cases[keys[only]]]:
        if only == "gqa":
            break
        torch.manual_seed(0)
        for granularity, target, modules in steps:
            prune_one_shot(model, inputs, target, granularity, modules)
        small = shrink(model, inputs)
        with torch.no_grad():
            reference = call(model, inputs)()
        error = relative_error(call(small, inputs), reference)
        compiled_dense, compiled_small = torch.compile(model), torch.compile(small)
        paths = {"dense": call(model, inputs), "shrunk": call(small, inputs),
                 "dense compiled": call(compiled_dense, inputs), "shrunk compiled": call(compiled_small, inputs)}
        tp_text, tp_error = "", ""
        if tp_options is not None:
            tp_model, failure = torch_pruning(model, inputs, tp_options["ratio"], lambda n, m, last=tp_options["last"]: n == last)
        else:
            tp_model, failure = torch_pruning_encoder(model, inputs)
        if tp_model is not None:
            paths["torch-pruning"] = call(tp_model, inputs)
            tp_error = f"{relative_error(paths['torch-pruning'], reference):.1e}"
        else:
            tp_text = tp_error = f"fails: {failure}"
        times = time_interleaved(paths, rounds=rounds or (5 if quick else 15), min_seconds=0.1 if quick else 0.3)
        if tp_model is not None:
            tp_text = f"{times['dense'] / times['torch-pruning']:.2f}x"
        kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
        rows.append(f"| {title} | {kept:.0%} | {times['dense'] / times['shrunk']:.2f}x "
                    f"| {times['dense compiled'] / times['shrunk compiled']:.2f}x | {error:.1e} | {tp_text} | {tp_error} |")
    if only in (None, "gqa"):
        rows.append(gqa_row())
    return rows


def torch_pruning_encoder(masked: nn.Module, inputs):
    """Torch-Pruning on the BERT-style encoder, the way its Transformers example does it."""
    def heads(model):
        return {getattr(m, p): m.num_attention_heads for m in model.modules() if hasattr(m, "query")
                for p in ("query", "key", "value")}

    def ignored(name, module):  # the residual stream stays whole (LayerNorm); only FFN and heads are pruned
        return name.endswith(("attention.output.dense", "output.dense")) or isinstance(module, (nn.Embedding, nn.LayerNorm))

    return torch_pruning(masked, inputs, 0.5, ignored, heads, prune_num_heads=True, prune_head_dims=False,
                         head_pruning_ratio=0.25)


def gqa_row() -> str:
    """Grouped-query attention: shrink on a tiny Llama, and Torch-Pruning on the same model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                         intermediate_size=128, vocab_size=100)).eval()
    inputs = token_inputs(2, 16)
    inputs["input_ids"] = inputs["input_ids"] % 100
    prune_one_shot(model, inputs, 0.5, "head", lambda n: n.endswith(("q_proj", "k_proj", "v_proj")))
    small = shrink(model, inputs)
    with torch.no_grad():
        reference = model(**inputs).logits
    error = relative_error(lambda: small(**inputs).logits, reference)
    def heads(copy_):
        return {getattr(m, p): n for m in copy_.modules() if hasattr(m, "q_proj")
                for p, n in (("q_proj", 8), ("k_proj", 2), ("v_proj", 2))}

    def ignored(name, module):
        return name == "lm_head" or name.endswith(("o_proj", "down_proj", "gate_proj", "up_proj"))

    tp_model, failure = torch_pruning(model, inputs, 0.5, ignored, heads, prune_num_heads=True,
                                      prune_head_dims=False, head_pruning_ratio=0.5)
    if tp_model is not None:
        try:
            tp_error = f"{relative_error(lambda: tp_model(**inputs).logits, reference):.1e}"
        except Exception as err:  # noqa: BLE001
            tp_error = f"fails when run: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
    else:
        tp_error = f"fails: {failure}"
    kept = sum(p.numel() for p in small.parameters()) / sum(p.numel() for p in model.parameters())
    return (f"| tiny Llama, GQA 8 query / 2 KV heads, 50% of KV heads | {kept:.0%} | | | {error:.1e} | | {tp_error} |")


# ----------------------------------------------------------------------------------------- quality
def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return train_x, train_y, test_x, test_y


def digits_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(64 * 4 * 4, 10))


def fit(model, data, steps, seed, callbacks=(), distill=None, lr=2e-3):
    train_x, train_y = data
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    manager = CompressionManager(*callbacks)
    manager.attach(model, optimizer)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(train_x), (64,), generator=g)
        x, y = train_x[index], train_y[index]
        logits = model(x)
        loss = distill(logits, y, inputs=x) if distill is not None else nn.functional.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return manager.finalize(model).eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def quality_rows(quick: bool) -> list[str]:
    train_x, train_y, test_x, test_y = digits_split()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and steadiest
    teacher_steps, steps = (200, 200) if quick else (1500, 1500)
    seeds = [0] if quick else [0, 1, 2]
    results: dict[str, list[float]] = {"dense teacher": [], "GMP + distillation, shrunk": [], "one-shot + fine-tuning, shrunk": []}
    for seed in seeds:
        torch.manual_seed(seed)
        teacher = fit(digits_cnn(), (train_x, train_y), teacher_steps, seed)
        results["dense teacher"].append(accuracy(teacher, test_x, test_y))
        starts = [copy.deepcopy(teacher) for _ in range(2)]  # before the teacher is frozen for distillation
        end = int(steps * 0.6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=end, update_every=max(1, end // 20),
                                          granularity="channel", exclude=["8"])
            student = fit(starts[0], (train_x, train_y), steps, seed + 100, [gmp],
                          DistillationLoss(teacher, temperature=4.0, alpha=0.9))
            one_shot = GradualMagnitudePruning(0.5, start_step=0, end_step=1, update_every=1, granularity="channel", exclude=["8"])
            baseline = fit(starts[1], (train_x, train_y), steps, seed + 100, [one_shot])
        for name, model in (("GMP + distillation, shrunk", student), ("one-shot + fine-tuning, shrunk", baseline)):
            small = shrink(model, test_x[:4])
            assert small[0].out_channels == 16 and small[3].out_channels == 32
            results[name].append(accuracy(small, test_x, test_y))
    rows = [f"| digits CNN, 50% channels ({steps} updates, {len(seeds)} seed(s)) | test accuracy, mean (min-max) |", "|---|---|"]
    for name, values in results.items():
        rows.append(f"| {name} | {statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f}) |")
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, one seed")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--only", choices=["cnn", "mlp", "encoder", "gqa"], help="one latency row")
    parser.add_argument("--rounds", type=int, help="timing rounds (default 15; 5 with --quick)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="one thread, timed by the calling thread's CPU time (steady on a busy machine)")
    args = parser.parse_args(argv)
    if args.cpu_time:
        torch.set_num_threads(1)
        CLOCK["clock"] = time.thread_time
    clock = "CPU time of the calling thread" if args.cpu_time else "wall time"
    lines = [f"torch {torch.__version__}, threads {torch.get_num_threads()}, {clock}", ""]
    if not args.skip_latency:
        lines += latency_rows(args.quick, args.rounds, args.only)
    if not args.skip_quality:
        lines += [""] + quality_rows(args.quick)
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
