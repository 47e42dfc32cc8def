"""Is each native C kernel (``compress_callbacks/_native.py``) still faster than what would run without it?

    PYTHONPATH=. python benchmarks/native_kernels.py [--sections kernels,steps] [--rounds N] [--repeats R]
                                                     [--threads T] [--no-compile]

``kernels``: each kernel alone, on the tensors it meets in ``benchmarks/pruning_overhead.py`` and
``benchmarks/qat_overhead.py`` (the MLP 1024-2048-1024-512-10, its activations at batch 64 and
256, a CNN activation), three implementations of the same values timed in one process:

* ``native``: the C kernel, as the package calls it;
* ``torch``: the pure-PyTorch path the package takes without a C compiler (or with
  ``COMPRESS_CALLBACKS_NATIVE=0``);
* ``compiled``: the same torch ops under ``torch.compile`` (Inductor's generated C++), as a
  reference for what a generated fused kernel gives (``--no-compile`` skips it).

Every round visits the implementations in a freshly shuffled order and times each one's fastest of
a few calls (a call takes about a scheduler time slice: preemption by other processes only ever adds
time); the figure is the interquartile mean, over rounds, of that time divided by the ``torch`` time
of the same round (< 1: faster than the pure-PyTorch path), with the quartiles. Magnitude selection (a
data-dependent radix select) has no ``compiled`` variant.

``steps``: what each kernel saves in a training step. QAT W8A8 (MLP b64 / b256, CNN+BN b32) and
GMP at 90% sparsity in steady state (MLP b64 / b256), SGD with momentum: the step with all the
kernels against the same step with one kernel switched off (or all of them). Each round runs, for
every switched-off variant in shuffled order, one step of it right next to one step with all the
kernels (which goes first is random); the figure is the interquartile mean of those adjacent
ratios (> 1: the kernel saves that much of the step), with the quartiles.

Both sections repeat ``--repeats`` times, to show the spread between repeats on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
import sys
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from compress_callbacks import _native
from compress_callbacks.pruning import masks as M
from compress_callbacks.quantization import fake_quant as FQ


def interquartile_mean(values: list[float]) -> float:
    ordered = sorted(values)
    cut = len(ordered) // 4
    middle = ordered[cut:len(ordered) - cut] or ordered
    return sum(middle) / len(middle)


def mlp_weights() -> list[torch.Tensor]:
    torch.manual_seed(0)
    sizes = (1024, 2048, 1024, 512, 10)
    return [torch.nn.Linear(a, b).weight.detach().clone() for a, b in zip(sizes, sizes[1:])]


def paired(variants: dict[str, Callable[[], object]], rounds: int, calls: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """Per variant: (interquartile mean, q1, q3) over rounds of its fastest call / the ``torch`` one that round."""
    for fn in variants.values():  # warm-up (and compilation)
        fn()
        fn()
    rng = random.Random(seed)
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        rng.shuffle(names)
        times = {}
        for name in names:
            best = float("inf")
            for _ in range(calls):  # the fastest call: preemption on a shared machine only ever adds time
                start = time.perf_counter()
                variants[name]()
                best = min(best, time.perf_counter() - start)
            times[name] = best
        for name in names:
            samples[name].append(times[name] / times["torch"])
    out = {}
    for name, ratios in samples.items():
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        out[name] = (interquartile_mean(ratios), q1, q3)
    return out


def mask_multiply_case(compile_: bool):
    weights = mlp_weights()
    keeps = M.unstructured_keep_masks(weights, 0.9)
    kernel = _native.mask_multiply_kernel()
    scratch = torch.empty(M.MASK_SCRATCH_ELEMENTS)

    variants = {
        "native": lambda: M.apply_keep_(weights, keeps, None, kernel),
        "torch": lambda: M.apply_keep_(weights, keeps, scratch),
    }
    if compile_:
        @torch.compile(fullgraph=True, dynamic=False)
        def compiled(ts, ks):
            for t, k in zip(ts, ks):
                t.mul_(k)

        variants["compiled"] = lambda: compiled(weights, keeps)
    return f"mask multiply t *= keep (MLP weights, {sum(w.numel() for w in weights) / 1e6:.2f}M)", variants


def weight_fake_quant_case(compile_: bool):
    weights = mlp_weights()
    scales = [FQ.per_channel_weight_scale(w, 8) for w in weights]
    kernel = _native.fake_quantize_rows_kernel()

    def torch_ops(w, s):
        s = s.reshape(-1, 1)
        return (w * s.reciprocal()).round_().mul_(s)

    variants = {
        "native": lambda: [kernel(w, s) for w, s in zip(weights, scales)],
        "torch": lambda: [torch_ops(w, s) for w, s in zip(weights, scales)],
    }
    if compile_:
        compiled = torch.compile(torch_ops, dynamic=False)
        variants["compiled"] = lambda: [compiled(w, s) for w, s in zip(weights, scales)]
    return "weight fake-quant round(w/s)*s per row (MLP weights)", variants


def activation_fake_quant_case(shape: tuple[int, ...], compile_: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).relu_()
    grad = torch.randn(*shape, generator=g)
    scale, zero_point = FQ.activation_qparams(x.min(), x.max())
    inv, lo, hi = FQ.activation_bounds(scale, zero_point)
    forward, backward = _native.activation_kernels()
    fs, fi, fl, fh = float(scale), float(inv), float(lo), float(hi)

    def native():
        out, inside = forward(x, fs, fi, fl, fh)
        return out, backward(grad, inside)

    def forward_ops(x, scale, inv, lo, hi):  # what the package's fallback runs
        rounded = (x * inv).round_()
        clamped = torch.clamp(rounded, lo, hi)
        return clamped.mul_(scale), clamped == rounded

    def backward_ops(grad, inside):
        return torch.where(inside, grad, 0.0)

    def torch_path(forward=forward_ops, backward=backward_ops):
        out, inside = forward(x, scale, inv, lo, hi)  # the mask is kept for the backward, as in training
        return out, backward(grad, inside)

    variants = {"native": native, "torch": torch_path}
    if compile_:
        compiled = (torch.compile(forward_ops, dynamic=False), torch.compile(backward_ops, dynamic=False))
        variants["compiled"] = lambda: torch_path(*compiled)
    return f"activation fake-quant forward + backward {list(shape)}", variants


def magnitude_select_case(scope: str):
    weights = mlp_weights()
    kernels = _native.magnitude_select_kernels

    def torch_path():
        _native.magnitude_select_kernels = lambda: None
        try:
            M.unstructured_keep_masks(weights, 0.9, scope=scope)
        finally:
            _native.magnitude_select_kernels = kernels

    variants = {"native": lambda: M.unstructured_keep_masks(weights, 0.9, scope=scope), "torch": torch_path}
    return f"magnitude selection to 90%, scope={scope} (MLP weights)", variants


@contextlib.contextmanager
def without_native(*getters: str):
    """The named getters of ``compress_callbacks._native`` return None in every module that imported them."""
    patched = [(module, name, getattr(module, name)) for module in list(sys.modules.values())
               if getattr(module, "__name__", "").startswith("compress_callbacks") for name in getters
               if callable(getattr(module, name, None))]
    for module, name, _ in patched:
        setattr(module, name, lambda: None)
    try:
        yield
    finally:
        for module, name, original in patched:
            setattr(module, name, original)


QAT_SWITCHED_OFF = {"no weight fake-quant kernel": ("fake_quantize_rows_kernel",),
                    "no activation fake-quant kernels": ("activation_kernels",),
                    "no kernels": ("fake_quantize_rows_kernel", "activation_kernels")}
GMP_SWITCHED_OFF = {"no mask-multiply kernel": ("mask_multiply_kernel",)}


STEP_KEYS = ("qat-b64", "qat-b256", "qat-cnn", "gmp-b64", "gmp-b256")  # --step-cases names, as in step_cases()


def step_cases():
    """(title, make_model, input shape, attach(model, optimizer), {variant: getters switched off})."""
    from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining
    from pruning_overhead import mlp as pruning_mlp
    from qat_overhead import make_cnn, make_mlp

    def qat(model, optimizer):
        CompressionManager(QuantizationAwareTraining(start_step=0)).attach(model, optimizer)

    def gmp(model, optimizer):  # one update reaches the final masks: every timed step masks at 90%
        CompressionManager(GradualMagnitudePruning(0.9, start_step=0, end_step=1, update_every=1)).attach(model, optimizer)

    return [
        ("QAT W8A8, MLP b64", make_mlp, (64, 1024), qat, QAT_SWITCHED_OFF),
        ("QAT W8A8, MLP b256", make_mlp, (256, 1024), qat, QAT_SWITCHED_OFF),
        ("QAT W8A8, CNN+BN b32", make_cnn, (32, 3, 32, 32), qat, QAT_SWITCHED_OFF),
        ("GMP 90%, MLP b64", lambda: pruning_mlp(False), (64, 1024), gmp, GMP_SWITCHED_OFF),
        ("GMP 90%, MLP b256", lambda: pruning_mlp(False), (256, 1024), gmp, GMP_SWITCHED_OFF),
    ]


def step_ratios(make_model, shape, attach, switched_off: dict, rounds: int, seed: int):
    """Per switched-off variant: (interquartile mean, q1, q3) of its step time / an adjacent all-kernels step."""
    torch.manual_seed(0)
    base = make_model()
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    built = {}
    for name, getters in {"all kernels": (), **switched_off}.items():
        model = copy.deepcopy(base)  # the same initial weights for every variant
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        with without_native(*getters):  # GMP takes its mask kernel at attach, QAT at every forward
            attach(model, optimizer)
        built[name] = (model, optimizer, getters)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(name) -> float:
        model, optimizer, getters = built[name]
        start = time.perf_counter()
        with without_native(*getters):
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for name in built:  # warm-up (and the first mask update)
        step(name), step(name)
    rng = random.Random(seed)
    others = list(switched_off)
    samples: dict[str, list[float]] = {name: [] for name in others}
    for _ in range(rounds):
        rng.shuffle(others)
        for name in others:
            if rng.random() < 0.5:
                base_time, time_off = step("all kernels"), step(name)
            else:
                time_off, base_time = step(name), step("all kernels")
            samples[name].append(time_off / base_time)
    out = {}
    for name, ratios in samples.items():
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        out[name] = (interquartile_mean(ratios), q1, q3)
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="kernels,steps", help="comma-separated subset of: kernels,steps")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5, help="kernels: calls per variant per round")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--step-cases", default=None, help=f"steps: comma-separated subset of {','.join(STEP_KEYS)}")
    args = parser.parse_args(argv)
    sections = [x.strip() for x in args.sections.split(",")]
    if any(x not in ("kernels", "steps") for x in sections):
        parser.error(f"--sections: choose from kernels, steps; got {sections}")
    chosen_steps = [c.strip() for c in (args.step_cases or ",".join(STEP_KEYS)).split(",")]
    if any(c not in STEP_KEYS for c in chosen_steps):
        parser.error(f"--step-cases: choose from {list(STEP_KEYS)}, got {chosen_steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if _native.mask_multiply_kernel() is None:
        raise SystemExit("the native kernels are unavailable here (no C compiler, or COMPRESS_CALLBACKS_NATIVE=0)")
    warnings.filterwarnings("ignore")
    lines = []

    def say(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    if "kernels" in sections:
        compile_ = not args.no_compile
        cases = [
            mask_multiply_case(compile_),
            weight_fake_quant_case(compile_),
            activation_fake_quant_case((64, 2048), compile_),
            activation_fake_quant_case((256, 2048), compile_),
            activation_fake_quant_case((32, 64, 16, 16), compile_),
            magnitude_select_case("layer"),
            magnitude_select_case("global"),
        ]
        say(f"Kernels: time / the pure-PyTorch path's time in the same round (< 1: faster), interquartile mean "
            f"[quartiles] over {args.rounds} rounds of the fastest of {args.calls} calls; torch threads {torch.get_num_threads()}")
        for title, variants in cases:
            say(title)
            for repeat in range(args.repeats):
                result = paired(variants, args.rounds, args.calls, seed=repeat)
                say(f"  repeat {repeat + 1}: " + "  ".join(
                    f"{name} {m:.3f} [{q1:.3f}-{q3:.3f}]" for name, (m, q1, q3) in result.items() if name != "torch"))
    if "steps" in sections:
        say(f"Steps: step time with kernels switched off / an adjacent step with all of them (> 1: the kernels save "
            f"time), interquartile mean [quartiles] over {args.rounds} rounds; torch threads {torch.get_num_threads()}")
        for key, (title, make_model, shape, attach, switched_off) in zip(STEP_KEYS, step_cases()):
            if key not in chosen_steps:
                continue
            say(title)
            for repeat in range(args.repeats):
                result = step_ratios(make_model, shape, attach, switched_off, args.rounds, seed=repeat)
                say(f"  repeat {repeat + 1}: " + "  ".join(
                    f"{name} {m:.3f} [{q1:.3f}-{q3:.3f}]" for name, (m, q1, q3) in result.items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
