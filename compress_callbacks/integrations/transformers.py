"""Transformers ``Trainer`` adapters: a ``TrainerCallback`` for the manager and a distilling ``Trainer``.

Add compression to an existing ``Trainer`` run with one callback::

    from compress_callbacks import CompressionManager, GradualMagnitudePruning
    from compress_callbacks.integrations.transformers import CompressionCallback

    manager = CompressionManager(GradualMagnitudePruning(target_sparsity=0.9, start_step=100, end_step=1000))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[CompressionCallback(manager)])
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)
    compressed = manager.finalize(trainer.model)

and distill by swapping ``Trainer`` for ``DistillationTrainer(..., distillation=DistillationLoss(teacher))``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..manager import CompressionManager

__all__ = ["STATE_FILE", "CompressionCallback", "DistillationTrainer"]

logger = logging.getLogger("compress_callbacks")

#: the manager's state inside every ``checkpoint-N/`` folder
STATE_FILE = "compression_state.pt"


def _running_training_call() -> tuple[Trainer | None, str | None]:
    """The ``Trainer`` whose ``train()`` is running and the checkpoint it resumes from (None: fresh run).

    The Trainer does not hand callbacks its ``resume_from_checkpoint``; the call itself is the only
    reliable place that holds it (a checkpoint may live outside ``output_dir``), so read it from the
    innermost training frame (``_inner_training_loop``, where ``True`` is already resolved).
    """
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and "resume_from_checkpoint" in frame.f_code.co_varnames:
            resume = frame.f_locals.get("resume_from_checkpoint")
            if resume is True:
                resume = get_last_checkpoint(owner.args.output_dir)
            return owner, (os.fspath(resume) if resume else None)
        frame = frame.f_back
    return None, None


class CompressionCallback(TrainerCallback):
    """Drive a :class:`CompressionManager` from ``transformers.Trainer``.

    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
    >>> from compress_callbacks import CompressionManager, GradualMagnitudePruning
    >>> config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    >>> model = BertForSequenceClassification(config)
    >>> data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.tensor(i % 2)} for i in range(16)]
    >>> manager = CompressionManager(GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=4, update_every=1))
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=4, per_device_train_batch_size=4, report_to=[],
    ...                          use_cpu=True, save_strategy="no", disable_tqdm=True)
    >>> trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[CompressionCallback(manager)])
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> manager.step, round(manager.callbacks[0].overall_sparsity(), 2)
    (4, 0.5)

    * ``on_train_begin``: attaches the manager to the model and the Trainer's real optimizer (it
      exists by then). The manager hooks the underlying ``torch.optim.Optimizer``, so it counts only
      updates that happened: a gradient-accumulation micro-batch is not an update, and neither is one
      the AMP grad scaler skipped (the Trainer's ``on_optimizer_step`` would count both).
    * ``on_save``: writes ``manager.state_dict()`` to ``checkpoint-N/compression_state.pt``.
    * ``trainer.train(resume_from_checkpoint=...)``: loads that file back before attaching, so masks,
      observer ranges and the step count continue where the checkpoint left them.
    * ``on_log``: adds the manager's values (``compress/...``) to the Trainer's logs. The callback
      moves itself first in the Trainer's callback list, so reporters (W&B, TensorBoard, ...) see them.

    Args:
        manager: the ``CompressionManager`` to drive (not yet attached).
    """

    def __init__(self, manager: CompressionManager) -> None:
        if not isinstance(manager, CompressionManager):
            raise TypeError(f"`manager` must be a CompressionManager, got {type(manager).__name__}")
        self.manager = manager

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer, resume = _running_training_call()
        if trainer is not None:
            _run_first(trainer, self)
        if resume is not None:
            path = os.path.join(resume, STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"resuming from {resume!r}, which holds no {STATE_FILE}: it was not saved with this "
                    "CompressionCallback, so masks and schedule position cannot be restored"
                )
            self.manager.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        elif state.global_step > 0:
            raise ValueError(
                f"training resumes at step {state.global_step}, but the checkpoint path is unknown; "
                f"call manager.load_state_dict(torch.load('<checkpoint>/{STATE_FILE}')) before trainer.train"
            )
        if self.manager.attached:
            if self.manager.model is not _unwrap(model) or self.manager.optimizer is not _real(optimizer):
                raise ValueError(
                    "the manager is `attach`ed to another model/optimizer; use one CompressionManager per Trainer"
                )
            return
        self.manager.attach(model, optimizer)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not state.is_world_process_zero:
            return
        if not os.path.isdir(folder):
            logger.warning("checkpoint folder %s not found; compression state not saved", folder)
            return
        torch.save(self.manager.state_dict(), os.path.join(folder, STATE_FILE))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.manager.attached or "loss" not in logs:
            return
        values = self.manager.collect_log_values()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def _run_first(trainer: Trainer, callback: TrainerCallback) -> None:
    """Put ``callback`` first in the handler's list (safe while the handler iterates over it).

    ``CallbackHandler.call_event`` iterates by index: removing our entry at index k and inserting
    it at 0 leaves every later callback at its index, so none is skipped or called twice.
    """
    callbacks = trainer.callback_handler.callbacks
    if callbacks and callbacks[0] is not callback and callback in callbacks:
        callbacks.remove(callback)
        callbacks.insert(0, callback)


def _unwrap(model: nn.Module | None) -> nn.Module | None:
    from ..targets import unwrap_model

    return unwrap_model(model) if model is not None else None


def _real(optimizer: Any) -> Any:
    from ..manager import underlying_optimizer

    return underlying_optimizer(optimizer) if optimizer is not None else None


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose training loss is a ``DistillationLoss`` (the teacher runs on the same batch).

    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
    >>> from compress_callbacks import DistillationLoss
    >>> config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    >>> teacher, student = BertForSequenceClassification(config), BertForSequenceClassification(config)
    >>> data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.tensor(i % 2)} for i in range(16)]
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4, report_to=[],
    ...                          use_cpu=True, save_strategy="no", disable_tqdm=True)
    >>> trainer = DistillationTrainer(model=student, args=args, train_dataset=data,
    ...                               distillation=DistillationLoss(teacher, temperature=2.0, alpha=0.5))
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> trainer.state.global_step, sorted(trainer.distillation.log_values())
    (2, ['hard', 'soft', 'total'])

    Args:
        *args, **kwargs: everything ``Trainer`` takes.
        distillation: a ``DistillationLoss(teacher, ...)``, called as
            ``distillation(student_outputs, labels, inputs=batch_without_labels)``. For a causal LM
            build it with ``shift_labels=True`` (logits at ``t`` against the label at ``t + 1``).

    * Gradient accumulation: the loss of each micro-batch is its mean over the positions it counts
      times their number, over ``num_items_in_batch`` (the Trainer's count for the whole accumulated
      batch), so micro-batches with different numbers of labelled tokens weigh as one big batch would.
    * Token-level tasks: labels equal to the loss's ``ignore_index`` (-100) are neither averaged nor
      counted.
    * The teacher lives in ``distillation``, not in the model: it is moved to the Trainer's device and
      never enters the optimizer or the student's checkpoints. Evaluation reports the student's own loss.
    * The loss's ``hard``/``soft``/``total`` values join the Trainer's logs as ``distill/...``.
    """

    def __init__(self, *args: Any, distillation: Any, **kwargs: Any) -> None:
        if not callable(distillation) or not isinstance(getattr(distillation, "teacher", None), nn.Module):
            raise TypeError(
                f"`distillation` must be a DistillationLoss(teacher, ...) with an nn.Module teacher, got {distillation!r}"
            )
        super().__init__(*args, **kwargs)
        if getattr(self, "_loss_shifts_labels", False) and not getattr(distillation, "shift_labels", False):
            raise ValueError(
                "`distillation`: this model's loss shifts labels (causal LM); build DistillationLoss(..., shift_labels=True)"
            )
        self.distillation = distillation
        distillation.teacher.to(self.args.device).eval()
        # Make the Trainer count the labelled positions of the accumulated batch (`num_items_in_batch`)
        # and pass them to compute_loss, which then returns a loss already scaled for accumulation.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        labels = inputs.get("labels")
        features = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**features)
        loss = self.distillation(outputs, labels, inputs=features)
        if num_items_in_batch is not None and labels is not None:
            counted = self._counted_positions(labels, features.get("attention_mask")).to(loss.device)
            loss = loss * counted / torch.as_tensor(num_items_in_batch, device=loss.device)
            if getattr(self.args, "average_tokens_across_devices", False):
                loss = loss * self.accelerator.num_processes  # the count was summed over ranks; DDP averages
        return (loss, outputs) if return_outputs else loss

    def _counted_positions(self, labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """How many positions the distillation loss averaged over in this micro-batch."""
        if getattr(self.distillation, "shift_labels", False):
            labels = labels[..., 1:]
            attention_mask = None if attention_mask is None else attention_mask[..., 1:]
        valid = labels.ne(getattr(self.distillation, "ignore_index", -100))
        if attention_mask is not None and labels.dim() >= 2 and attention_mask.shape == labels.shape:
            valid = valid & attention_mask.bool()
        return valid.sum()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and hasattr(self.distillation, "log_values"):
            for key, value in self.distillation.log_values().items():
                logs[f"distill/{key}"] = float(value)
        super().log(logs, *args, **kwargs)
