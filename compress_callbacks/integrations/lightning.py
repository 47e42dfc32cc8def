"""Lightning adapter: a ``Callback`` that drives a :class:`CompressionManager` inside ``Trainer.fit``.

Add it to the Trainer; the LightningModule stays as it is::

    from compress_callbacks import CompressionManager, GradualMagnitudePruning
    from compress_callbacks.integrations.lightning import CompressionCallback

    manager = CompressionManager(GradualMagnitudePruning(target_sparsity=0.9, start_step=100, end_step=1000))
    trainer = L.Trainer(max_steps=2000, callbacks=[CompressionCallback(manager)])
    trainer.fit(module)                                # or trainer.fit(module, ckpt_path="last")
    compressed = manager.finalize(module)

Distillation needs no adapter: keep a ``DistillationLoss`` in the LightningModule and return it from
``training_step``. Its teacher is not a registered submodule, so it stays out of the optimizer and
of the checkpoints, and it follows the student's device on first use::

    class LitStudent(L.LightningModule):
        def __init__(self, student, teacher):
            super().__init__()
            self.student = student
            self.distill = DistillationLoss(teacher, temperature=4.0, alpha=0.9)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = self.distill(self.student(x), y, inputs=x)
            self.log_dict({f"distill/{k}": v for k, v in self.distill.log_values().items()})
            return loss
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as L
except ImportError:  # the standalone package
    import pytorch_lightning as L

from ..manager import CompressionManager, underlying_optimizer

__all__ = ["CompressionCallback"]


class CompressionCallback(L.Callback):
    """Drive a :class:`CompressionManager` from a Lightning ``Trainer``.

    >>> import torch, torch.nn as nn
    >>> import lightning.pytorch as L
    >>> from compress_callbacks import CompressionManager, GradualMagnitudePruning
    >>> class Regression(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1))
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return nn.functional.mse_loss(self.net(x), y)
    ...     def configure_optimizers(self):
    ...         return torch.optim.AdamW(self.parameters(), lr=1e-2)
    >>> data = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    >>> manager = CompressionManager(GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=4, update_every=2))
    >>> trainer = L.Trainer(max_steps=6, callbacks=[CompressionCallback(manager)], accelerator="cpu", logger=False,
    ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(Regression(), torch.utils.data.DataLoader(data, batch_size=8))
    >>> manager.step, manager.callbacks[0].overall_sparsity()
    (6, 0.5)

    * ``on_fit_start``: attaches the manager to the LightningModule and to the real torch optimizer.
      Lightning has no hook after an optimizer step, so the manager hooks the optimizer itself: an
      accumulation micro-batch or an update skipped by the AMP grad scaler is not counted, and
      ``manager.step`` equals ``trainer.global_step``.
    * Checkpoints: the manager's ``state_dict()`` (masks, observer ranges, step) is this callback's
      state, stored in every Lightning checkpoint and restored by ``trainer.fit(..., ckpt_path=...)``
      before the manager attaches.
    * ``on_train_batch_end``: when the manager logged since the last batch (every ``log_every`` real
      updates and at events: attach, mask updates, QAT starting / freezing), those values
      (``compress/...``, see ``docs/manager.md``) go to ``trainer.loggers`` at the manager's step and to
      ``pl_module.log_dict(..., logger=False)`` (``callback_metrics``, for monitors). Nothing is measured
      on the other steps.

    Args:
        manager: the ``CompressionManager`` to drive (not yet attached).
        optimizer_index: which of ``configure_optimizers``' optimizers trains the compressed
            weights (None: the only one).
        log: whether to forward the manager's logged values to Lightning.
    """

    def __init__(self, manager: CompressionManager, *, optimizer_index: int | None = None, log: bool = True) -> None:
        if not isinstance(manager, CompressionManager):
            raise TypeError(f"`manager` must be a CompressionManager, got {type(manager).__name__}")
        if optimizer_index is not None and (isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int)):
            raise TypeError(f"`optimizer_index` must be an int or None, got {optimizer_index!r}")
        self.manager = manager
        self.optimizer_index = optimizer_index
        self.log = bool(log)
        self._forwarded = 0  # number of the manager's last record sent to Lightning

    def _optimizer(self, trainer: Any) -> Any:
        optimizers = list(trainer.optimizers)
        if self.optimizer_index is None:
            if len(optimizers) != 1:
                raise ValueError(
                    f"the LightningModule has {len(optimizers)} optimizers; pass `optimizer_index` to choose the "
                    "one that trains the compressed weights"
                )
            return optimizers[0]
        if not 0 <= self.optimizer_index < len(optimizers):
            raise ValueError(f"`optimizer_index` must be in [0, {len(optimizers)}), got {self.optimizer_index}")
        return optimizers[self.optimizer_index]

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        optimizer = self._optimizer(trainer)
        if self.manager.attached:
            if self.manager.model is not pl_module or self.manager.optimizer is not underlying_optimizer(optimizer):
                raise ValueError(
                    "the manager is `attach`ed to another model/optimizer; use one CompressionManager per LightningModule"
                )
            return
        self.manager.attach(pl_module, optimizer)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        logged = self.manager.last_logged if self.log and self.manager.attached else None
        if logged is None or logged[0] == self._forwarded:
            return
        self._forwarded, step, values = logged
        pl_module.log_dict(values, on_step=True, on_epoch=False, logger=False)
        for logger in trainer.loggers:  # as LearningRateMonitor does: the event's own step
            logger.log_metrics(values, step=step)

    def state_dict(self) -> dict[str, Any]:
        return self.manager.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.manager.load_state_dict(state_dict)
