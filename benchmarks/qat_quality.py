"""Accuracy on scikit-learn's digits: fp32, post-training quantization, and QAT at 8/4/2-bit weights.

For every seed (3 by default): an MLP 64-256-128-10 is trained in fp32 (AdamW, batch 64); the QAT
runs are the same run with ``QuantizationAwareTraining(start_step=<end of the fp32 phase>)``
attached from the start, so they share the fp32 phase and then train the same number of extra
epochs with fake-quant (the fp32 row trains those epochs in fp32). Post-training rows calibrate the
fp32 model (``compress_callbacks.quantization.ptq.calibrate``, min/max over the training set).
Activations (layer inputs) are int8 in every quantized row; weights are W8, W4 or W2.

Each quantized row is evaluated twice: "fake-quant" (float model with fake-quantized inputs and
on-grid weights: ``ptq.fake_quantized``) and "int8" (``compress_callbacks.export.to_int8``, a real
int8 ONNX Runtime model). The test set is 30% of digits (540 images; one image = 0.185 points).

Run: ``PYTHONPATH=. python benchmarks/qat_quality.py`` (``--quick``: 1 seed, fewer epochs, int8
evaluation of the QAT W8A8 row only).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_callbacks import CompressionManager, QuantizationAwareTraining
from compress_callbacks.quantization.ptq import calibrate, fake_quantized


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    to_tensor = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return to_tensor(x_train), torch.tensor(y_train), to_tensor(x_test), torch.tensor(y_test)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def train(model, x, y, epochs: int, seed: int, qat: QuantizationAwareTraining | None = None, lr: float = 2e-3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    manager = None
    if qat is not None:
        manager = CompressionManager(qat)
        manager.attach(model, optimizer)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * ((len(x) + 63) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
    model.eval()
    return manager.finalize(model) if manager is not None else model


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(-1) == y).float().mean())


def evaluate_quantized(model, x, y, int8: bool) -> tuple[float, float | None]:
    with torch.no_grad(), fake_quantized(model):
        fake = accuracy(model, x, y)
    real = None
    if int8:
        from compress_callbacks.export import to_int8

        real = accuracy(to_int8(model, example_inputs=x[:1]), x, y)
    return fake, real


def run_seed(seed: int, fp32_epochs: int, qat_epochs: int, bits: list[int], int8: str) -> dict[str, tuple]:
    """``int8``: "all" rows, "qat8" (only QAT W8A8, for --quick) or "none"."""
    x_train, y_train, x_test, y_test = load_data(seed)
    steps_per_epoch = (len(x_train) + 63) // 64
    fp32 = train(make_model(seed), x_train, y_train, fp32_epochs + qat_epochs, seed)
    rows = {"fp32": (accuracy(fp32, x_test, y_test), None)}
    calibration = [x_train[i : i + 256] for i in range(0, len(x_train), 256)]
    for b in bits:
        ptq = calibrate(copy.deepcopy(fp32), calibration, weight_bits=b)
        rows[f"post-training W{b}A8"] = evaluate_quantized(ptq, x_test, y_test, int8 == "all")
    for b in bits:
        qat = QuantizationAwareTraining(start_step=fp32_epochs * steps_per_epoch, weight_bits=b)
        model = train(make_model(seed), x_train, y_train, fp32_epochs + qat_epochs, seed, qat=qat)
        rows[f"QAT W{b}A8"] = evaluate_quantized(model, x_test, y_test, int8 == "all" or (int8 == "qat8" and b == 8))
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer epochs (< 60 s)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--fp32-epochs", type=int, default=None)
    parser.add_argument("--qat-epochs", type=int, default=None)
    parser.add_argument("--no-int8", action="store_true", help="skip the ONNX Runtime int8 evaluation")
    args = parser.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    fp32_epochs = args.fp32_epochs or (8 if args.quick else 30)
    qat_epochs = args.qat_epochs or (4 if args.quick else 20)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(min(2, torch.get_num_threads()))

    int8 = "none" if args.no_int8 else ("qat8" if args.quick else "all")
    per_seed = [run_seed(s, fp32_epochs, qat_epochs, [8, 4, 2], int8) for s in range(seeds)]
    fp32 = statistics.mean(r["fp32"][0] for r in per_seed)
    lines = [
        f"digits test accuracy (%), mean over {seeds} seed(s); fp32 {fp32_epochs + qat_epochs} epochs, "
        f"QAT = {fp32_epochs} fp32 + {qat_epochs} QAT epochs",
        "| model | fake-quant | int8 (ONNX Runtime) | vs fp32 | per seed |",
        "|---|---|---|---|---|",
    ]
    for name in per_seed[0]:
        fake = statistics.mean(r[name][0] for r in per_seed)
        reals = [r[name][1] for r in per_seed]
        real = statistics.mean(reals) if all(r is not None for r in reals) else None
        shown = real if real is not None else fake
        seeds_text = " / ".join(f"{(r[name][1] if r[name][1] is not None else r[name][0]):.2f}" for r in per_seed)
        lines.append(
            f"| {name} | {fake:.2f} | {'-' if real is None else f'{real:.2f}'} | {shown - fp32:+.2f} | {seeds_text} |"
        )
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
