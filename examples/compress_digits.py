"""Compress a digits classifier end to end: teacher -> distilled, pruned, QAT student -> int8.

One command, scikit-learn's digits (ships with scikit-learn, nothing is downloaded), about a
minute on a 2-core laptop::

    python examples/compress_digits.py                      # writes runs/digits/
    python examples/compress_digits.py --help               # techniques, sparsity, bits, steps...

Unchanged under two CPU processes (DDP through Accelerate)::

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no examples/compress_digits.py

What it does:

1. trains a teacher MLP;
2. trains a smaller *dense student* the plain way (cross-entropy, float32) as the baseline;
3. trains the same student architecture with distillation + gradual magnitude pruning + QAT in
   ONE Accelerate loop, using the few lines of ``compress_callbacks``
   (``manager.attach(model, optimizer)``, ``DistillationLoss``, a plain ``optimizer.step()``);
4. finalizes it, converts it to a real int8 model and to an ExecuTorch program for phones and
   boards (``export_executorch``: XNNPACK, run here through ``executorch.runtime``) and prints a
   table: accuracy, parameters, non-zero parameters, file size, CPU latency and top-1 agreement
   with the teacher;
5. writes to the output folder: ``student.ccz`` (compact checkpoint), ``student.onnx``,
   ``student.pte`` (ExecuTorch), ``recipe.yaml``, ``metrics.json``, ``training.png`` (and the float
   checkpoints it compares).

``main(argv)`` returns the metrics dict, so tests (and notebooks) can call it directly.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from collections import OrderedDict
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from compress_callbacks import (
    CompressionManager,
    DistillationLoss,
    GradualMagnitudePruning,
    QuantizationAwareTraining,
)
from compress_callbacks.export import export_onnx, load_compressed, save_compressed, to_int8
from compress_callbacks.metrics import Sparsity, TeacherStudentAgreement
from compress_callbacks.quantization.ptq import calibrate, fake_quantized

NUM_CLASSES = 10
NUM_FEATURES = 64  # 8x8 images


# ----------------------------------------------------------------------------------- arguments
def _bits(text: str) -> int | None:
    return None if text.lower() in {"none", "0", "off"} else int(text)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1], got {text}")
    return value


def _sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Distill + prune + QAT a digits MLP in one Accelerate loop, then convert it to int8.",
    )
    g = p.add_argument_group("techniques (all on by default)")
    g.add_argument("--no-distill", dest="distill", action="store_false", help="train the student on labels only")
    g.add_argument("--no-prune", dest="prune", action="store_false", help="no gradual magnitude pruning")
    g.add_argument("--no-qat", dest="qat", action="store_false",
                   help="no quantization-aware training: the student is quantized after training (calibrate)")
    g = p.add_argument_group("pruning")
    g.add_argument("--sparsity", type=float, default=None,
                   help="final fraction of zero weights in every hidden Linear (the classifier stays dense; "
                        "default 0.8; N:M granularity implies 1 - N/M)")
    g.add_argument("--granularity", default="unstructured",
                   help="'unstructured' (default), 'channel' (whole output rows) or 'N:M' (e.g. '2:4')")
    g.add_argument("--scope", default="layer", choices=["layer", "global"],
                   help="every layer reaches the target, or all layers together (default: %(default)s)")
    g.add_argument("--prune-window", type=_fraction, nargs=2, default=[0.1, 0.6], metavar=("START", "END"),
                   help="pruning starts / reaches the target at these fractions of the student's updates "
                        "(default: 0.1 0.6)")
    g = p.add_argument_group("quantization")
    g.add_argument("--weight-bits", type=int, default=8, help="weight bits, 2..8 (default: %(default)s)")
    g.add_argument("--activation-bits", type=_bits, default=8,
                   help="activation bits: 8 or 'none' for weight-only (default: %(default)s)")
    g.add_argument("--qat-start", type=_fraction, default=0.7,
                   help="fake-quant starts at this fraction of the student's updates (default: %(default)s)")
    g = p.add_argument_group("distillation")
    g.add_argument("--temperature", type=float, default=4.0, help="softening temperature (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=0.7, help="weight of the soft (teacher) term (default: %(default)s)")
    g = p.add_argument_group("training")
    g.add_argument("--teacher-hidden", type=_sizes, default=[256, 256],
                   help="teacher hidden sizes, comma separated (default: 256,256)")
    g.add_argument("--student-hidden", type=_sizes, default=[128, 64],
                   help="student hidden sizes, comma separated (default: 128,64)")
    g.add_argument("--teacher-epochs", type=int, default=30, help="(default: %(default)s)")
    g.add_argument("--epochs", type=int, default=40,
                   help="student epochs, for the dense and the compressed student (default: %(default)s)")
    g.add_argument("--steps", type=int, default=None, help="student optimizer updates (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=64,
                   help="global batch size, split over the processes (default: %(default)s)")
    g.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every N updates (default: every epoch)")
    g.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    g.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads per process; 1 is fastest for layers this small, 0 keeps torch's "
                        "default (default: %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", type=Path, default=Path("runs/digits"), help="(default: %(default)s)")
    g.add_argument("--latency-repeats", type=int, default=300,
                   help="timed batch-1 forward passes per model (default: %(default)s)")
    g.add_argument("--no-pte", dest="pte", action="store_false",
                   help="do not write the ExecuTorch program student.pte (its export takes 10-30 s)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.sparsity is None and ":" not in args.granularity:
        args.sparsity = 0.8
    if args.prune_window[0] >= args.prune_window[1]:
        parser.error(f"--prune-window START must be < END, got {args.prune_window}")
    if args.threads < 0:
        parser.error("--threads must be >= 0")
    for name in ("teacher_epochs", "epochs", "batch_size", "latency_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    if not 2 <= args.weight_bits <= 8:
        parser.error(f"--weight-bits must be in 2..8, got {args.weight_bits}")
    if args.activation_bits not in (8, None):
        parser.error(f"--activation-bits must be 8 or 'none', got {args.activation_bits}")
    if not args.temperature > 0 or not 0.0 <= args.alpha <= 1.0:
        parser.error("--temperature must be > 0 and --alpha in [0, 1]")
    return args


# ----------------------------------------------------------------------------------- data and models
def load_digits_split(seed: int, test_fraction: float = 0.2) -> tuple[torch.Tensor, ...]:
    """Digits as float features in [0, 1] and int64 labels, a stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(), test_size=test_fraction, random_state=seed, stratify=y.numpy()
    )
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


#: the output layer stays dense: pruning its rows ("channel" granularity) would delete whole classes
PRUNING_EXCLUDE = ["classifier"]


def make_mlp(hidden: list[int]) -> nn.Sequential:
    """``fc1 -> ReLU -> fc2 -> ReLU ... -> classifier``: 64 inputs to 10 logits."""
    layers: dict[str, nn.Module] = {}
    width = NUM_FEATURES
    for i, h in enumerate(hidden, start=1):
        layers[f"fc{i}"], layers[f"relu{i}"] = nn.Linear(width, h), nn.ReLU()
        width = h
    layers["classifier"] = nn.Linear(width, NUM_CLASSES)
    return nn.Sequential(OrderedDict(layers))


# ----------------------------------------------------------------------------------- training
class History:
    """What the plot and the JSON show, recorded on every rank (identical after the reductions)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.loss: list[float] = []
        self.hard_loss: list[float] = []  # the cross-entropy part of a distillation loss
        self.sparsity: list[float] = []
        self.eval_steps: list[int] = []
        self.accuracy: list[float] = []

    def as_dict(self) -> dict[str, list]:
        return dict(vars(self))


@torch.no_grad()
def predict(accelerator: Accelerator, model: nn.Module, loader: DataLoader) -> torch.Tensor:
    """Logits for the whole (prepared) evaluation set, gathered from every rank, in order."""
    was_training = model.training
    model.eval()
    outputs = []
    for x, _ in loader:
        outputs.append(accelerator.gather_for_metrics(model(x)))
    model.train(was_training)
    return torch.cat(outputs).float()


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


def train(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    eval_loader: DataLoader,
    test_y: torch.Tensor,
    *,
    steps: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    eval_every: int,
    desc: str,
    progress: bool,
    sparsity_fn: Callable[[], float] | None = None,
    hard_loss_fn: Callable[[], float] | None = None,
) -> History:
    """A plain Accelerate loop: nothing here knows about compression (the manager hooks the optimizer)."""
    history = History()
    bar = tqdm(total=steps, desc=desc, disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True, leave=True)
    step = 0
    model.train()
    while step < steps:
        for x, y in loader:
            with accelerator.accumulate(model):
                logits = model(x)
                loss = loss_fn(logits, y, x)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            step += 1
            history.steps.append(step)
            history.loss.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
            if hard_loss_fn is not None:
                hard = torch.tensor(hard_loss_fn(), device=loss.device)
                history.hard_loss.append(float(accelerator.reduce(hard, reduction="mean")))
            history.sparsity.append(sparsity_fn() if sparsity_fn is not None else 0.0)
            if step % eval_every == 0 or step == steps:
                history.eval_steps.append(step)
                history.accuracy.append(accuracy(predict(accelerator, model, eval_loader), test_y))
                bar.set_postfix(loss=f"{history.loss[-1]:.3f}", acc=f"{history.accuracy[-1]:.3f}",
                                sparsity=f"{history.sparsity[-1]:.2f}")
            bar.update(1)
            if step >= steps:
                break
    bar.close()
    return history


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, targets)


def build_callbacks(args: argparse.Namespace, steps: int) -> list:
    """The compression plan, scaled to the run's number of optimizer updates."""
    callbacks = []
    if args.prune:
        start = int(args.prune_window[0] * steps)
        end = max(start + 1, int(args.prune_window[1] * steps))
        callbacks.append(GradualMagnitudePruning(
            target_sparsity=args.sparsity, start_step=start, end_step=end,
            update_every=max(1, (end - start) // 20), granularity=args.granularity, scope=args.scope,
            exclude=PRUNING_EXCLUDE,
        ))
    if args.qat:
        start = int(args.qat_start * steps)
        callbacks.append(QuantizationAwareTraining(
            start_step=start, weight_bits=args.weight_bits, activation_bits=args.activation_bits,
            freeze_observers_step=start + max(1, (steps - start) // 2),
        ))
    return callbacks


# ----------------------------------------------------------------------------------- measuring
def pruned_weight_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over the weights pruning targets here (every Linear but the classifier)."""
    metric = Sparsity(exclude=PRUNING_EXCLUDE, sync_on_compute=False)  # ranks hold identical weights under DDP
    metric.update(model)
    return float(metric.compute())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)


@torch.inference_mode()
def cpu_latency_ms(model: nn.Module, example: torch.Tensor, repeats: int) -> float:
    """Median wall time of a batch-1 forward pass on the CPU, in milliseconds."""
    model.eval()
    example = example.cpu()
    for _ in range(max(5, repeats // 10)):
        model(example)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(example)
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("model", "model", "{}"),
        ("accuracy", "accuracy", "{:.4f}"),
        ("params", "params", "{:,}"),
        ("nonzero_params", "non-zero", "{:,}"),
        ("file_bytes", "file size", None),
        ("latency_ms", "CPU latency (ms, batch 1)", "{:.3f}"),
        ("agreement", "agreement w/ teacher", "{:.4f}"),
    ]
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([_human_bytes(row[k]) if fmt is None else fmt.format(row[k]) for k, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("| " + " | ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} B"


def plot_history(path: Path, compressed: History, dense: History, teacher_accuracy: float,
                 callbacks: list, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True, constrained_layout=True)
    ax_s, ax_l, ax_a = axes
    steps = compressed.steps

    gmp = next((cb for cb in callbacks if isinstance(cb, GradualMagnitudePruning)), None)
    qat = next((cb for cb in callbacks if isinstance(cb, QuantizationAwareTraining)), None)
    ax_s.plot(steps, compressed.sparsity, color="C0", lw=2, label="measured (zeros in pruned layers)")
    if gmp is not None:
        ax_s.plot(steps, [gmp.sparsity_at(s) for s in steps], color="k", ls="--", lw=1, label="schedule")
    ax_s.set_ylabel("sparsity")
    ax_s.set_ylim(-0.02, 1.0)

    window = max(1, len(steps) // 60)
    ax_l.plot(dense.steps, _smooth(dense.loss, window), color="C7", label="dense student (cross-entropy)")
    if compressed.hard_loss:
        ax_l.plot(steps, _smooth(compressed.loss, window), color="C0", lw=1, alpha=0.5,
                  label="compressed student (distillation loss)")
        ax_l.plot(steps, _smooth(compressed.hard_loss, window), color="C0", label="compressed student (its cross-entropy)")
    else:
        ax_l.plot(steps, _smooth(compressed.loss, window), color="C0", label="compressed student (cross-entropy)")
    ax_l.set_ylabel("training loss")
    ax_l.set_yscale("log")

    ax_a.plot(dense.eval_steps, dense.accuracy, color="C7", marker=".", label="dense student")
    ax_a.plot(compressed.eval_steps, compressed.accuracy, color="C0", marker=".", label="compressed student")
    ax_a.axhline(teacher_accuracy, color="C3", ls=":", label=f"teacher ({teacher_accuracy:.3f})")
    low = min(dense.accuracy[len(dense.accuracy) // 4:] + compressed.accuracy[len(compressed.accuracy) // 4:])
    ax_a.set_ylim(max(0.0, low - 0.03), 1.0)
    ax_a.set_ylabel("test accuracy")
    ax_a.set_xlabel("optimizer updates")

    for ax in axes:
        if gmp is not None:
            ax.axvspan(gmp.start_step, gmp.end_step, color="C2", alpha=0.08, lw=0,
                       label="pruning ramp" if ax is ax_s else None)
        if qat is not None:
            ax.axvline(qat.start_step, color="C1", ls="-.", lw=1, label="QAT starts" if ax is ax_s else None)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole example for parsed arguments (``main`` parses them and sets the thread count)."""
    started = time.perf_counter()
    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True))
    if args.batch_size % accelerator.num_processes:
        raise ValueError(f"--batch-size ({args.batch_size}) must be a multiple of the {accelerator.num_processes} processes")
    set_seed(args.seed)
    say = accelerator.print
    out = args.output_dir
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    train_x, train_y, test_x, test_y = load_digits_split(args.seed)
    loader_generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(TensorDataset(train_x, train_y), batch_size=args.batch_size, shuffle=True,
                              drop_last=True, generator=loader_generator)
    eval_loader = DataLoader(TensorDataset(test_x, test_y), batch_size=128 * accelerator.num_processes)
    train_loader, eval_loader = accelerator.prepare(train_loader, eval_loader)
    steps_per_epoch = len(train_loader)
    student_steps = args.steps or args.epochs * steps_per_epoch
    eval_every = args.eval_every or steps_per_epoch
    callbacks = build_callbacks(args, student_steps)  # built first: a bad setting fails before any training
    say(f"digits: {len(train_y)} train / {len(test_y)} test images, {accelerator.num_processes} process(es), "
        f"{steps_per_epoch} updates per epoch")

    def fit(model: nn.Module, steps: int, loss_fn, desc: str, manager_callbacks: list | None = None,
            hard_loss_fn=None):
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
        model, optimizer = accelerator.prepare(model, optimizer)
        manager = None
        sparsity_fn = None
        if manager_callbacks:
            manager = CompressionManager(*manager_callbacks, accelerator=accelerator)
            manager.attach(model, optimizer)  # the loop needs no other call
            gmp = next((cb for cb in manager_callbacks if isinstance(cb, GradualMagnitudePruning)), None)
            sparsity_fn = gmp.overall_sparsity if gmp is not None else None
        history = train(accelerator, model, optimizer, train_loader, eval_loader, test_y, steps=steps,
                        loss_fn=loss_fn, eval_every=eval_every, desc=desc, progress=args.progress,
                        sparsity_fn=sparsity_fn, hard_loss_fn=hard_loss_fn)
        return model, manager, history

    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        seconds[stage] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    # 1. teacher ---------------------------------------------------------------------------
    set_seed(args.seed)
    teacher, _, teacher_history = fit(make_mlp(args.teacher_hidden), args.teacher_epochs * steps_per_epoch,
                                      cross_entropy, "teacher")
    teacher = accelerator.unwrap_model(teacher).eval().requires_grad_(False)
    lap("teacher")

    # 2. dense student: same architecture, same updates, labels only, float32 ---------------
    set_seed(args.seed + 1)
    dense, _, dense_history = fit(make_mlp(args.student_hidden), student_steps, cross_entropy, "dense student")
    dense = accelerator.unwrap_model(dense).eval()
    lap("dense_student")

    # 3. compressed student: distillation + pruning + QAT in one loop ------------------------
    set_seed(args.seed + 1)  # same initial weights as the dense student
    if args.distill:
        distill = DistillationLoss(teacher, temperature=args.temperature, alpha=args.alpha)
        loss_fn = lambda logits, y, x: distill(logits, y, inputs=x)  # noqa: E731  teacher runs on `inputs`
        hard_loss_fn = lambda: distill.log_values()["hard"]  # noqa: E731  the cross-entropy part, for the plot
    else:
        loss_fn, hard_loss_fn = cross_entropy, None
    student, manager, student_history = fit(make_mlp(args.student_hidden), student_steps, loss_fn,
                                            "compressed student", callbacks, hard_loss_fn)
    trained_sparsity = pruned_weight_sparsity(accelerator.unwrap_model(student))  # before the int8 grid
    if manager is not None:
        say(manager.summary())
        compressed = manager.finalize(student)  # plain nn.Sequential, standard state_dict keys
    else:
        compressed = accelerator.unwrap_model(student)
    compressed.eval()
    lap("compressed_student")

    # 4. measure: accuracy and agreement on every rank (gathered), files and latency on the main process
    logits = {
        "teacher": predict(accelerator, teacher, eval_loader),
        "dense student": predict(accelerator, dense, eval_loader),
    }
    results: dict[str, Any] = {}
    if accelerator.is_main_process:
        histories = {"teacher": teacher_history, "dense_student": dense_history, "compressed_student": student_history}
        results = report(args, accelerator, out, teacher, dense, compressed, manager, callbacks, logits,
                         train_x, test_x, test_y, trained_sparsity, histories, student_steps,
                         seconds, lambda: round(time.perf_counter() - started, 1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def write_pte(args, compressed: nn.Module, example: torch.Tensor, calibration, path: Path):
    """``student.pte`` (ExecuTorch, XNNPACK) and an ``nn.Module`` that runs it; ``(None, None)`` when skipped."""
    if not args.pte:
        return None, None
    from compress_callbacks.export import ExecuTorchModule, export_executorch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = export_executorch(compressed, example, path, calibration=calibration)
        except ImportError as error:  # executorch missing (the [edge] extra, part of [examples]): the rest still runs
            print(f"student.pte skipped: {error}")
            return None, None
    for warning in caught:
        if issubclass(warning.category, UserWarning) and "export_executorch" in str(warning.message):
            print(warning.message)
    print(f"student.pte: {result.size_bytes} bytes; on the example input it differs from the fake-quant model by "
          f"{result.max_error:.2%} of the output range")
    return ExecuTorchModule(result.path), result


def report(args, accelerator, out: Path, teacher, dense, compressed, manager, callbacks, logits, train_x, test_x,
           test_y, trained_sparsity: float, histories: dict[str, History], student_steps: int,
           seconds: dict[str, float], elapsed: Callable[[], float]) -> dict[str, Any]:
    """Everything the main process writes and prints."""
    cpu = torch.device("cpu")
    teacher, dense, compressed = (copy.deepcopy(m).to(cpu).eval() for m in (teacher, dense, compressed))
    test_x, example = test_x.to(cpu), test_x[:1].to(cpu)
    if not args.qat:  # no QAT: post-training quantization on training inputs gives the int8 ranges
        calibrate(compressed, train_x[:512].to(cpu).split(128), weight_bits=args.weight_bits,
                  activation_bits=args.activation_bits)

    torch.save(teacher.state_dict(), out / "teacher.pt")
    torch.save(dense.state_dict(), out / "dense_student.pt")
    save_compressed(compressed, out / "student.ccz")
    export_onnx(compressed, example_inputs=example, path=out / "student.onnx")
    int8_model = to_int8(compressed, example_inputs=example)
    pte_model, pte = write_pte(args, compressed, example, train_x[:512].to(cpu).split(128), out / "student.pte")

    # the compact checkpoint loads into a fresh copy of the architecture
    reloaded = make_mlp(args.student_hidden)
    load_compressed(out / "student.ccz", reloaded)

    with torch.inference_mode():
        int8_logits = int8_model(test_x).float()
        pte_logits = pte_model(test_x).float() if pte_model is not None else None  # 1 row per call: its batch
        reloaded_logits = reloaded.eval()(test_x).float()
        finalized_logits = compressed(test_x).float()  # weights on their int8 grid, float activations
        with fake_quantized(compressed):
            fake_quant_logits = compressed(test_x).float()  # what the int8 model should compute
    teacher_logits = logits["teacher"].to(cpu)

    def agreement(student_logits: torch.Tensor) -> dict[str, float]:
        # the logits are already gathered from every rank: no second sync inside the metric
        metric = TeacherStudentAgreement(sync_on_compute=False)
        metric.update(student_logits.to(cpu), teacher_logits)
        return {k: float(v) for k, v in metric.compute().items()}

    rows = []
    quantized = "" if args.qat else ", PTQ"
    models = [
        ("teacher", teacher, out / "teacher.pt", teacher_logits),
        ("dense student", dense, out / "dense_student.pt", logits["dense student"].to(cpu)),
        (f"compressed student (int8{quantized})", int8_model, out / "student.ccz", int8_logits),
    ]
    if pte_model is not None:
        models.append((f"compressed student (ExecuTorch .pte{quantized})", pte_model, out / "student.pte", pte_logits))
    for name, model, path, lg in models:
        # parameters are counted on the float model; the int8 models store the same weights (zeros stay zeros)
        total, nonzero = count_parameters(compressed if model in (int8_model, pte_model) else model)
        rows.append({
            "model": name,
            "accuracy": accuracy(lg, test_y),
            "params": total,
            "nonzero_params": nonzero,
            "file_bytes": path.stat().st_size,
            "latency_ms": cpu_latency_ms(model, example, args.latency_repeats),
            **{k if k == "agreement" else f"teacher_{k}": v for k, v in agreement(lg).items()},
        })
    table = format_table(rows)

    gmp = next((cb for cb in callbacks if isinstance(cb, GradualMagnitudePruning)), None)
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(manager.to_recipe_yaml() if manager is not None else "{}\n")

    metrics = {
        "command": " ".join(sys.argv),
        "processes": accelerator.num_processes,
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "student_steps": student_steps,
        "table": rows,
        "requested_sparsity": gmp.target_sparsity if gmp is not None else 0.0,
        "measured_sparsity": trained_sparsity,  # zeros in the pruned weights after training
        "int8_weight_zero_fraction": pruned_weight_sparsity(compressed),  # once on the int8 grid (>=)
        "finalized_float_accuracy": accuracy(finalized_logits, test_y),
        "int8_vs_finalized": {
            "top1_agreement": float((int8_logits.argmax(-1) == finalized_logits.argmax(-1)).float().mean()),
            "max_abs_logit_diff_vs_fake_quant": float((int8_logits - fake_quant_logits).abs().max()),
            "fake_quant_logit_range": float(fake_quant_logits.abs().max()),
        },
        "reloaded_vs_finalized_max_abs_diff": float((reloaded_logits - finalized_logits).abs().max()),
        "onnx_bytes": (out / "student.onnx").stat().st_size,
        "pte": None if pte is None else {  # the ExecuTorch program's parity gate and what it calibrated
            "bytes": pte.size_bytes, "max_error_vs_fake_quant": pte.max_error, "argmax_agreement": pte.argmax_agreement,
            "test_top1_agreement_vs_fake_quant": float((pte_logits.argmax(-1) == fake_quant_logits.argmax(-1)).float().mean()),
            "calibrated_points": pte.calibrated_points, "float_layers": pte.float_layers,
        },
        "history": {name: h.as_dict() for name, h in histories.items()},
        "seconds": seconds,
    }
    techniques = [t for t, on in (("distillation", args.distill), ("pruning", args.prune), ("QAT", args.qat)) if on]
    title = (f"digits student {args.student_hidden}: {' + '.join(techniques) or 'no compression'}"
             + (f", {args.granularity} sparsity {metrics['requested_sparsity']:.2f}" if gmp is not None else "")
             + (f", W{args.weight_bits}A{args.activation_bits or 'fp'}" if args.qat else ""))
    plot_history(out / "training.png", histories["compressed_student"], histories["dense_student"],
                 rows[0]["accuracy"], callbacks, title)
    seconds["setup_and_report"] = round(elapsed() - sum(seconds.values()), 2)
    seconds["total"] = elapsed()
    metrics["files"] = sorted({p.name for p in out.iterdir()} | {"metrics.json"})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))

    print()
    print(table)
    print(f"\nzeros in the student's hidden-layer weights: {trained_sparsity:.4f} after training (requested "
          f"{metrics['requested_sparsity']:.4f}), {metrics['int8_weight_zero_fraction']:.4f} on the int8 grid; "
          f"int8 vs finalized float: top-1 agreement {metrics['int8_vs_finalized']['top1_agreement']:.4f}")
    print(f"wrote {', '.join(metrics['files'])} to {out}/ in {seconds['total']:.0f} s")
    metrics["table_text"] = table
    return metrics


if __name__ == "__main__":
    main()
