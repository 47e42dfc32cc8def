"""Distill, prune and fake-quantize a digits MLP inside a LightningModule (sklearn digits, no downloads).

    PYTHONPATH=. python examples/lightning_module.py --steps 300

The LightningModule holds a `DistillationLoss` (its teacher is not a submodule: it never reaches the
optimizer or the checkpoints); the Trainer gets one `CompressionCallback`. Lines added to a plain
Lightning script are marked with `# <-`.
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as L
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

from compress_callbacks import CompressionManager, DistillationLoss
from compress_callbacks.integrations.lightning import CompressionCallback


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, teacher: nn.Module | None = None, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        self.distill = DistillationLoss(teacher, temperature=4.0, alpha=0.7) if teacher is not None else None  # <-

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        if self.distill is None:
            return nn.functional.cross_entropy(logits, y)
        loss = self.distill(logits, y, inputs=x)  # <- teacher runs on x under no_grad
        self.log_dict({f"distill/{k}": v for k, v in self.distill.log_values().items()})
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = slice(0, 1400), slice(1400, None)
    loader = DataLoader(TensorDataset(x[train], y[train]), batch_size=32, shuffle=True)
    quiet = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    teacher = mlp(256)
    L.Trainer(max_steps=options.steps, enable_checkpointing=False, **quiet).fit(Classifier(teacher), loader)

    steps = options.steps
    manager = CompressionManager.from_recipe({"callbacks": {  # <-
        "GradualMagnitudePruning": {"target_sparsity": 0.9, "start_step": steps // 10, "end_step": steps // 2,
                                    "update_every": 10, "exclude": ["net.4"]},
        "QuantizationAwareTraining": {"start_step": steps * 2 // 3, "freeze_observers_step": steps * 9 // 10},
    }})
    student = Classifier(mlp(64), teacher=teacher)
    checkpoints = tempfile.mkdtemp(prefix="cc_lightning_")
    trainer = L.Trainer(max_steps=steps, callbacks=[CompressionCallback(manager)], default_root_dir=checkpoints, **quiet)  # <-
    trainer.fit(student, loader)
    table = manager.summary()
    compressed = manager.finalize(student).net  # <- plain nn.Sequential: zeros and the int8 grid baked in
    return (
        f"steps {manager.step} (trainer.global_step {trainer.global_step}); test accuracy: teacher "
        f"{accuracy(teacher, x[test], y[test]):.3f}, student 90% sparse + QAT {accuracy(compressed, x[test], y[test]):.3f}\n{table}"
    )


if __name__ == "__main__":
    print(main())
