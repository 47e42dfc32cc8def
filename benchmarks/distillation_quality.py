"""Does distillation help? scikit-learn digits, three seeds, a tiny student on 10% of the labels.

Student MLP 64-32-10 trained on 10% of the training split with hard labels only, versus the same
student, data and budget with ``DistillationLoss`` from a 64-512-512-10 teacher trained on the
whole training split. Also shown: the textbook ``nn.KLDivLoss()`` (``reduction="mean"``) soft term,
which divides by the class count and wastes the teacher.

    PYTHONPATH=. python benchmarks/distillation_quality.py            # full (three seeds)
    PYTHONPATH=. python benchmarks/distillation_quality.py --quick    # one seed, fewer epochs
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_callbacks import DistillationLoss

TEMPERATURE = 4.0  # the documented defaults of DistillationLoss
ALPHA = 0.9


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)
    x_small, _, y_small, _ = train_test_split(x_train, y_train, train_size=0.1, stratify=y_train, random_state=seed)
    as_x = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)  # noqa: E731  pixel values are 0..16
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return (as_x(x_train), as_y(y_train)), (as_x(x_small), as_y(y_small)), (as_x(x_test), as_y(y_test))


def mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def train(model, x, y, loss_fn, *, epochs, batch_size, lr, weight_decay, seed):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = loss_fn(model(x[idx]), y[idx], x[idx])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
    return model


def textbook_mean_kd(teacher, temperature, alpha):
    """The common snippet: nn.KLDivLoss() (reduction='mean') times T^2, mixed with cross-entropy."""
    kl = nn.KLDivLoss()
    warnings.filterwarnings("ignore", message="reduction: 'mean'")

    def loss_fn(logits, y, x):
        with torch.no_grad():
            t = teacher(x)
        soft = kl(F.log_softmax(logits / temperature, -1), F.softmax(t / temperature, -1)) * temperature**2
        return alpha * soft + (1 - alpha) * F.cross_entropy(logits, y)

    return loss_fn


def run_seed(seed: int, *, student_epochs: int, teacher_epochs: int) -> dict[str, float]:
    (x_train, y_train), (x_small, y_small), (x_test, y_test) = load_digits_split(seed)
    torch.manual_seed(seed)
    teacher = train(mlp(64, 512, 512, 10), x_train, y_train, lambda o, y, x: F.cross_entropy(o, y),
                    epochs=teacher_epochs, batch_size=64, lr=1e-3, weight_decay=1e-4, seed=seed)
    teacher.eval()
    # full-batch AdamW (the 10% subset is ~135 samples), cosine schedule; identical for every student
    budget = dict(epochs=student_epochs, batch_size=len(x_small), lr=1e-2, weight_decay=1e-4, seed=seed)
    results = {"teacher (full split)": accuracy(teacher, x_test, y_test)}

    torch.manual_seed(seed + 1)
    hard = train(mlp(64, 32, 10), x_small, y_small, lambda o, y, x: F.cross_entropy(o, y), **budget)
    results["student, hard labels"] = accuracy(hard, x_test, y_test)

    torch.manual_seed(seed + 1)
    pitfall = train(mlp(64, 32, 10), x_small, y_small, textbook_mean_kd(teacher, 2.0, ALPHA), **budget)
    results["student, KLDivLoss() 'mean', T=2"] = accuracy(pitfall, x_test, y_test)

    torch.manual_seed(seed + 1)
    distill = DistillationLoss(teacher, temperature=TEMPERATURE, alpha=ALPHA)
    kd = train(mlp(64, 32, 10), x_small, y_small, lambda o, y, x: distill(o, y, inputs=x), **budget)
    results[f"student, DistillationLoss (T={TEMPERATURE:g}, alpha={ALPHA:g})"] = accuracy(kd, x_test, y_test)
    return results


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer epochs (< 60 s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    epochs = dict(student_epochs=500, teacher_epochs=15) if args.quick else dict(student_epochs=2000, teacher_epochs=30)
    torch.set_num_threads(1)  # tiny models: one thread is fastest and keeps runs reproducible
    start = time.perf_counter()
    per_seed = [run_seed(seed, **epochs) for seed in seeds]
    rows = list(per_seed[0])
    lines = [
        f"digits test accuracy (%), seeds {seeds}, student 64-32-10 on 10% of the training split "
        f"({epochs['student_epochs']} full-batch steps, same budget for every student)",
        f"{'run':<46} {'mean':>6}  " + "  ".join(f"seed{s:<3}" for s in seeds),
    ]
    for row in rows:
        values = [100 * r[row] for r in per_seed]
        lines.append(f"{row:<46} {statistics.mean(values):6.2f}  " + "  ".join(f"{v:7.2f}" for v in values))
    lines.append(f"({time.perf_counter() - start:.0f} s)")
    table = "\n".join(lines)
    print(table)
    return table


if __name__ == "__main__":
    main()
