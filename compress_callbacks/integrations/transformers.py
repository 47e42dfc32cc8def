"""Transformers ``Trainer`` adapters: a ``TrainerCallback`` for the manager and a distilling ``Trainer``.

Add compression to an existing ``Trainer`` run with one callback::

    from compress_callbacks import CompressionManager, GradualMagnitudePruning
    from compress_callbacks.integrations.transformers import CompressionCallback

    manager = CompressionManager(GradualMagnitudePruning(target_sparsity=0.9, start_step=100, end_step=1000))
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[CompressionCallback(manager)])
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)
    compressed = manager.finalize(trainer.model)

and distill by swapping ``Trainer`` for ``DistillationTrainer(..., distillation=DistillationLoss(teacher))``
(logits) and/or ``features=FeatureDistillation(model, teacher, ...)`` (hidden states, sentence embeddings).
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

from ..distillation.features import FeatureDistillation, _first_tensor
from ..distillation.loss import DistillationLoss
from ..manager import CompressionManager

__all__ = ["FEATURE_STATE_FILE", "STATE_FILE", "CompressionCallback", "DistillationTrainer"]

logger = logging.getLogger("compress_callbacks")

#: the manager's state inside every ``checkpoint-N/`` folder
STATE_FILE = "compression_state.pt"
#: the feature projections of ``DistillationTrainer(features=...)`` inside every ``checkpoint-N/``
FEATURE_STATE_FILE = "feature_distillation.pt"


def _constructing_trainer() -> Trainer | None:
    """The ``Trainer`` whose ``__init__`` is running (callbacks get ``on_init_end`` from there; no argument holds it)."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and frame.f_code.co_name == "__init__":
            return owner
        frame = frame.f_back
    return None


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
    {'loss': ...}
    {'train_runtime': ...}
    >>> manager.step, round(manager.callbacks[0].overall_sparsity(), 2)
    (4, 0.5)
    >>> [round(logs["compress/GradualMagnitudePruning/mask_sparsity"], 2) for logs in trainer.state.log_history if "loss" in logs]
    [0.29, 0.44, 0.49, 0.5]

    (The masks change at every step here: each mask update is an event, logged at its step.)

    * ``on_train_begin``: attaches the manager to the model and the Trainer's real optimizer (it
      exists by then). The manager hooks the underlying ``torch.optim.Optimizer``, so it counts only
      updates that happened: a gradient-accumulation micro-batch is not an update, and neither is one
      the AMP grad scaler skipped (the Trainer's ``on_optimizer_step`` would count both).
      A technique that adds parameters to the optimizer (``QuantizationAwareTraining(learn_scales=True)``)
      is attached earlier, when ``train`` creates the optimizer (``trainer.create_optimizer``), so that a
      resumed run's saved optimizer state, loaded before ``on_train_begin``, finds them. (That needs the
      callback at the Trainer's construction, ``callbacks=[...]``; one added later with ``add_callback``:
      ``manager.attach(model, trainer.create_optimizer())`` before ``train``.) A manager attached
      already is taken as it is.
    * ``on_save``: every rank computes ``manager.state_dict()`` (a collective under FSDP2); the main
      process writes it to ``checkpoint-N/compression_state.pt``.
    * ``trainer.train(resume_from_checkpoint=...)``: loads that file back before attaching, so masks,
      observer ranges and the step count continue where the checkpoint left them. Where the
      checkpoint's path cannot be found, load it yourself before ``trainer.train``
      (``manager.load_state_dict(torch.load("<checkpoint>/compression_state.pt"))``): a manager
      already at the resumed step is taken as it is.
    * ``on_log``: adds the manager's values (``compress/...``, see ``docs/manager.md``) to the Trainer's
      logs, measured then (at the Trainer's ``logging_steps``, not on every step). The callback moves
      itself first in the Trainer's callback list, so reporters (W&B, TensorBoard, ...) see them.
      After an update with a compression event (a mask update, QAT starting or freezing) it asks the
      Trainer to log at that step (``control.should_log``).

    Args:
        manager: the ``CompressionManager`` to drive (not yet attached).
    """

    def __init__(self, manager: CompressionManager) -> None:
        if not isinstance(manager, CompressionManager):
            raise TypeError(f"`manager` must be a CompressionManager, got {type(manager).__name__}")
        self.manager = manager

    def on_init_end(self, args, state, control, **kwargs):
        trainer = _constructing_trainer()
        if trainer is None or not any(cb.adds_optimizer_parameters for cb in self.manager.callbacks):
            return
        # learned scales must be in the optimizer before a resumed run loads its state, which the
        # Trainer does before on_train_begin: attach when train() creates the optimizer instead
        create_optimizer = trainer.create_optimizer

        def create_optimizer_then_attach(*args: Any, **kwargs: Any):
            optimizer = create_optimizer(*args, **kwargs)
            if not self.manager.attached and _running_training_call()[0] is trainer:
                self.manager.attach(trainer.model, optimizer)
            return optimizer

        trainer.create_optimizer = create_optimizer_then_attach

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
        elif state.global_step > 0 and self.manager.step != state.global_step:
            # the checkpoint's path is unknown here; a manager that already holds that step's state is fine
            raise ValueError(
                f"training resumes at step {state.global_step}, but the checkpoint path is unknown and the manager is "
                f"at step {self.manager.step}; call manager.load_state_dict(torch.load('<checkpoint>/{STATE_FILE}')) "
                "with that checkpoint's file before trainer.train"
            )
        if self.manager.attached:
            if self.manager.model is not _unwrap(model) or self.manager.optimizer is not _real(optimizer):
                raise ValueError(
                    "the manager is `attach`ed to another model/optimizer; use one CompressionManager per Trainer"
                )
            return
        self.manager.attach(model, optimizer)

    def on_save(self, args, state, control, **kwargs):
        # every rank: under FSDP2 the state gathers each rank's block of the masks (a collective)
        manager_state = self.manager.state_dict()
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            logger.warning("checkpoint folder %s not found; compression state not saved", folder)
            return
        torch.save(manager_state, os.path.join(folder, STATE_FILE))

    def on_step_end(self, args, state, control, **kwargs):
        if self.manager.attached and state.global_step > 0 and self.manager.last_event_step == state.global_step:
            control.should_log = True  # a mask update / QAT phase change reaches the trackers at its step

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


class _FeatureCallback(TrainerCallback):
    """Zeroes the projections' gradients after every update (the Trainer zeroes the model's only), saves the
    projections in every checkpoint and loads them back when training resumes."""

    def __init__(self, features: FeatureDistillation) -> None:
        self.features = features

    def on_train_begin(self, args, state, control, **kwargs):
        _, resume = _running_training_call()
        if resume is None:
            return
        path = os.path.join(resume, FEATURE_STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming from {resume!r}, which holds no {FEATURE_STATE_FILE}: it was not saved by a "
                "DistillationTrainer with `features=`, so the learned projections cannot be restored"
            )
        self.features.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def on_step_end(self, args, state, control, **kwargs):
        self.features.zero_grad(set_to_none=True)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            torch.save(self.features.state_dict(), os.path.join(folder, FEATURE_STATE_FILE))


class DistillationTrainer(Trainer):
    """A ``Trainer`` whose training loss is distillation: logits, hidden states, embeddings (no ``compute_loss`` to write).

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
        features: a ``FeatureDistillation(model, teacher, ...)`` (hidden states, named modules, or
            pooled sentence embeddings with ``pooling="mean"``); its loss times ``feature_weight`` is
            added. Without ``distillation`` (e.g. a sentence-embedding student with no logits and no
            labels) the trainer runs the teacher itself and the loss is the feature term alone.
        feature_weight: weight of the feature term, a number > 0.

    * Gradient accumulation: each term of a micro-batch is weighted by the positions it averaged
      over, against the whole accumulated batch's count (labelled positions for ``distillation``:
      the Trainer's ``num_items_in_batch``; attention-mask tokens for token-level features, sequences
      for pooled ones), so micro-batches weigh as one big batch would.
    * Token-level tasks: labels equal to the loss's ``ignore_index`` (-100) are neither averaged nor
      counted; padding (attention mask 0) never counts in either term.
    * The teacher lives in ``distillation`` / ``features``, not in the model: it is moved to the
      Trainer's device and never enters the optimizer or the student's checkpoints. Evaluation reports
      the student's own loss.
    * The projections of ``features`` join the optimizer the Trainer creates (an optimizer passed
      with ``optimizers=`` must hold them already) and ``max_grad_norm`` clipping (one norm over
      the model's and their gradients), are saved in every ``checkpoint-N/`` as
      ``feature_distillation.pt`` and restored on ``train(resume_from_checkpoint=...)``; under DDP
      they are wrapped like the model, so every rank keeps identical projections.
    * The losses' values join the Trainer's logs as ``distill/...`` (``distill/feature/...``).

    >>> import torch
    >>> from transformers import BertConfig, BertModel, TrainingArguments
    >>> from compress_callbacks import FeatureDistillation
    >>> def bert(width, depth):
    ...     return BertModel(BertConfig(hidden_size=width, num_hidden_layers=depth, num_attention_heads=2,
    ...                                 intermediate_size=2 * width, vocab_size=50), add_pooling_layer=False)
    >>> student, teacher = bert(16, 1), bert(32, 2)       # a sentence-embedding student, no labels
    >>> features = FeatureDistillation(student, teacher, layers=[-1], pooling="mean", loss="cosine")
    >>> data = [{"input_ids": torch.randint(1, 50, (8,)), "attention_mask": torch.ones(8, dtype=torch.long)}] * 8
    >>> args = TrainingArguments("/tmp/cc_doctest_features", max_steps=2, per_device_train_batch_size=4, report_to=[],
    ...                          use_cpu=True, save_strategy="no", disable_tqdm=True)
    >>> trainer = DistillationTrainer(model=student, args=args, train_dataset=data, features=features)
    >>> _ = trainer.train()  # doctest: +ELLIPSIS
    {'train_runtime': ...}
    >>> features.projections["hidden_states_1"].weight.shape   # 16 -> 32, trained with the student
    torch.Size([32, 16])
    """

    def __init__(
        self,
        *args: Any,
        distillation: Any = None,
        features: FeatureDistillation | None = None,
        feature_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if distillation is None and features is None:
            raise TypeError("pass `distillation=DistillationLoss(teacher, ...)`, `features=FeatureDistillation(...)` or both")
        if distillation is not None and (
            not callable(distillation) or not isinstance(getattr(distillation, "teacher", None), nn.Module)
        ):
            raise TypeError(
                f"`distillation` must be a DistillationLoss(teacher, ...) with an nn.Module teacher, got {distillation!r}"
            )
        if features is not None:
            _check_features(features, distillation, args[0] if args else kwargs.get("model"), kwargs.get("optimizers"))
        if isinstance(feature_weight, bool) or not isinstance(feature_weight, (int, float)) or not feature_weight > 0:
            raise ValueError(f"`feature_weight` must be a number > 0, got {feature_weight!r}")
        super().__init__(*args, **kwargs)
        if (
            distillation is not None
            and getattr(self, "_loss_shifts_labels", False)
            and not getattr(distillation, "shift_labels", False)
        ):
            raise ValueError(
                "`distillation`: this model's loss shifts labels (causal LM); build DistillationLoss(..., shift_labels=True)"
            )
        self.distillation = distillation
        self.features = features
        self.feature_weight = float(feature_weight)
        # what runs the teacher when only features are distilled: DistillationLoss's teacher call (device, precision)
        self._teacher_call = distillation if distillation is not None else DistillationLoss(features.teacher)
        self._teacher_call.teacher.to(self.args.device).eval()
        self._features_call: nn.Module | None = None  # `features`, DDP-wrapped on several processes
        self._feature_items: torch.Tensor | None = None  # feature positions in the accumulated batch
        if features is not None:
            features.to(self.args.device)
            self.add_callback(_FeatureCallback(features))
        # Make the Trainer count the labelled positions of the accumulated batch (`num_items_in_batch`) and
        # pass them to compute_loss, which returns a loss already scaled for accumulation (each term by its count).
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    # ------------------------------------------------------------------ optimizer and batches
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.features is not None:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            missing = [p for p in self.features.parameters() if p.requires_grad and id(p) not in owned]
            if missing:
                optimizer.add_param_group({"params": missing, "weight_decay": self.args.weight_decay})
        return optimizer

    def _clip_grad_norm(self, model):
        """Clip the model's and the projections' gradients together (the Trainer clips the model's alone)."""
        projections = list(self.features.parameters()) if self.features is not None else []
        if not projections or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *projections], self.args.max_grad_norm)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.features is not None and batch_samples:
            total = sum(self._feature_positions(batch) for batch in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                total = self.accelerator.gather(total).sum()
            self._feature_items = total
        return batch_samples, num_items_in_batch

    def _feature_positions(self, batch: dict[str, Any]) -> torch.Tensor:
        """How many positions the feature loss averages over for ``batch`` (tokens, or sequences when pooled)."""
        mask = batch.get("attention_mask")
        if self.features.pooling is None and isinstance(mask, torch.Tensor):
            return mask.ne(0).sum()
        first = next(value for value in batch.values() if isinstance(value, torch.Tensor))
        return torch.tensor(first.shape[0])

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        labels = inputs.get("labels")
        batch = {key: value for key, value in inputs.items() if key != "labels"}
        outputs = model(**batch)
        accumulation = getattr(self, "current_gradient_accumulation_steps", 1)
        across_devices = self.accelerator.num_processes if getattr(self.args, "average_tokens_across_devices", False) else 1
        loss = None
        if self.distillation is not None:
            loss = self.distillation(outputs, labels, inputs=batch)
            if num_items_in_batch is not None and labels is not None:
                counted = self._counted_positions(labels, batch.get("attention_mask")).to(loss.device)
                # the count was summed over ranks (average_tokens_across_devices); DDP averages: scale back up
                loss = loss * counted / torch.as_tensor(num_items_in_batch, device=loss.device) * across_devices
            else:
                loss = loss / accumulation
        else:
            self._teacher_call.teacher_outputs(batch, like=_first_tensor(outputs))
        if self.features is not None:
            term = self._feature_module()() * self.feature_weight
            if self._feature_items is not None:
                share = self._feature_positions(batch).to(term.device) / self._feature_items.to(term.device)
                term = term * share * across_devices  # the count was summed over ranks when across_devices > 1
            else:
                term = term / accumulation
            loss = term if loss is None else loss + term
        return (loss, outputs) if return_outputs else loss

    def _feature_module(self) -> nn.Module:
        """``features``, wrapped by Accelerate (DDP) on several processes so that projection gradients are averaged."""
        if self._features_call is None:
            several = self.accelerator.num_processes > 1 and any(True for _ in self.features.parameters())
            self._features_call = self.accelerator.prepare_model(self.features) if several else self.features
        return self._features_call

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
        if "loss" in logs:
            for source in (self.distillation, self.features):
                for key, value in (source.log_values() if hasattr(source, "log_values") else {}).items():
                    logs[f"distill/{key}"] = float(value)
        super().log(logs, *args, **kwargs)


def _check_features(features: Any, distillation: Any, model: Any, optimizers: Any) -> None:
    """``features`` fits this Trainer: built for its model, with the distillation's teacher, owned by a given optimizer."""
    if not isinstance(features, FeatureDistillation):
        raise TypeError(f"`features` must be a FeatureDistillation(model, teacher, ...), got {type(features).__name__}")
    if model is not None and _unwrap(features.student) is not _unwrap(model):
        raise ValueError("`features` was built for another student: build FeatureDistillation(model, teacher, ...) with the Trainer's model")
    if distillation is not None and features.teacher is not distillation.teacher:
        raise ValueError("`features` and `distillation` must share one teacher (it runs once per batch, for both)")
    optimizer = optimizers[0] if isinstance(optimizers, (tuple, list)) and optimizers else None
    if optimizer is not None:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if any(id(p) not in owned for p in features.parameters()):
            raise ValueError(
                "`optimizers`: the optimizer does not hold the feature projections; add `features.parameters()` to it"
            )
