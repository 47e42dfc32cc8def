"""Lightning: CompressionCallback (real updates, sparsity, checkpoint resume) and distilling in a LightningModule."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from compress_callbacks import CompressionManager, DistillationLoss, GradualMagnitudePruning
from compress_callbacks.integrations.lightning import CompressionCallback


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))


class Classifier(L.LightningModule):
    def __init__(self, seed=0):
        super().__init__()
        self.net = mlp(seed)
        self.batches = 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)


class DistilledClassifier(L.LightningModule):
    """The documented pattern: a DistillationLoss in the module, returned from training_step."""

    def __init__(self, teacher):
        super().__init__()
        self.net = mlp(0)
        self.distill = DistillationLoss(teacher, temperature=2.0, alpha=1.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.distill(self.net(x), y, inputs=x)
        self.log_dict({f"distill/{k}": v for k, v in self.distill.log_values().items()})
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader(n=64, batch_size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = x[:, :4].argmax(dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, manager, max_steps, **options):
    return L.Trainer(
        max_steps=max_steps, callbacks=[CompressionCallback(manager), *options.pop("callbacks", [])],
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=options.pop("enable_checkpointing", False), default_root_dir=tmp_path, **options,
    )


def gmp(**overrides):
    options = dict(target_sparsity=0.75, start_step=2, end_step=10, update_every=2)
    options.update(overrides)
    return GradualMagnitudePruning(**options)


def test_real_updates_under_accumulation_reach_the_target_sparsity(tmp_path):
    module = Classifier()
    manager = CompressionManager(gmp())
    fit = trainer(tmp_path, manager, max_steps=12, accumulate_grad_batches=2)
    fit.fit(module, loader())
    assert module.batches == 24
    assert manager.step == fit.global_step == 12
    assert manager.callbacks[0].layer_sparsities() == {"net.0": 0.75, "net.2": 0.75}
    assert fit.callback_metrics["compress/GradualMagnitudePruning/mask_sparsity"] == pytest.approx(0.75)


def test_checkpoint_resume_restores_masks_and_step_and_matches_an_uninterrupted_run(tmp_path):
    # saved after the last batch of epoch 0: Lightning replays a plain DataLoader exactly from there
    # (mid-epoch it would need a stateful loader, which is Lightning's business, not the manager's)
    every_8 = dict(every_n_train_steps=8, save_top_k=-1, dirpath=tmp_path / "ckpt")
    module_a, manager_a = Classifier(), CompressionManager(gmp())
    trainer(tmp_path, manager_a, max_steps=16, enable_checkpointing=True,
            callbacks=[ModelCheckpoint(**every_8)]).fit(module_a, loader())
    checkpoint = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"
    saved = torch.load(checkpoint, weights_only=True)["callbacks"]["CompressionCallback"]
    assert saved["step"] == 8

    module_b, manager_b = Classifier(seed=123), CompressionManager(gmp())  # weights come from the checkpoint
    fit_b = trainer(tmp_path, manager_b, max_steps=16)
    fit_b.fit(module_b, loader(), ckpt_path=str(checkpoint))

    assert manager_b.step == fit_b.global_step == manager_a.step == 16
    masks_a = manager_a.state_dict()["callbacks"]["0:GradualMagnitudePruning"]["masks"]
    masks_b = manager_b.state_dict()["callbacks"]["0:GradualMagnitudePruning"]["masks"]
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    for a, b in zip(module_a.net.parameters(), module_b.net.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert manager_b.callbacks[0].overall_sparsity() == 0.75


def test_distilling_in_a_lightning_module_trains_and_keeps_the_teacher_out_of_checkpoints(tmp_path):
    teacher = mlp(seed=7, hidden=64)
    module = DistilledClassifier(teacher)
    x = loader().dataset.tensors[0]

    def gap():
        with torch.no_grad():
            return float(nn.functional.kl_div(module.net(x).log_softmax(-1), teacher(x).log_softmax(-1),
                                              log_target=True, reduction="batchmean"))

    before = gap()
    manager = CompressionManager(gmp(target_sparsity=0.5, start_step=4, end_step=8))
    fit = trainer(tmp_path, manager, max_steps=40, enable_checkpointing=True,
                  callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1)])
    fit.fit(module, loader())
    assert gap() < 0.5 * before
    assert manager.callbacks[0].overall_sparsity() == 0.5
    assert "distill/soft" in fit.callback_metrics
    state = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=True)["state_dict"]
    assert set(state) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}  # no teacher
    assert all(p.grad is None for p in teacher.parameters())


def test_closure_steps_mask_the_gradients_the_closure_computes():
    """Lightning steps as optimizer.step(closure): gradients exist only inside the step call."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    manager = CompressionManager(gmp(start_step=0, end_step=2, update_every=1))
    manager.attach(model, optimizer)
    x, y = loader().dataset.tensors

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    assert manager.step == 5
    assert manager.callbacks[0].layer_sparsities() == {"0": 0.75, "2": 0.75}


def test_bad_arguments_fail_fast():
    manager = CompressionManager(gmp())
    with pytest.raises(TypeError, match="`manager`"):
        CompressionCallback(gmp())
    with pytest.raises(TypeError, match="`optimizer_index`"):
        CompressionCallback(manager, optimizer_index="0")
