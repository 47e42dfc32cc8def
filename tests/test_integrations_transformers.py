"""Transformers Trainer: CompressionCallback (updates, checkpoints, resume, logs) and DistillationTrainer."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    Trainer,
    TrainingArguments,
)

from compress_callbacks import CompressionManager, DistillationLoss, GradualMagnitudePruning
from compress_callbacks.integrations.transformers import STATE_FILE, CompressionCallback, DistillationTrainer

VOCAB = 100


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert(cls=BertForSequenceClassification, seed=0, hidden=32, num_labels=2):
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
        vocab_size=VOCAB, max_position_embeddings=32, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return cls(config)


def classification_data(n=64, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, length), generator=g)
    labels = (ids[:, 0] < VOCAB // 2).long()  # learnable: the first token decides
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def arguments(output_dir, **overrides):
    options = dict(
        max_steps=8, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[], use_cpu=True,
        save_strategy="no", logging_steps=2, disable_tqdm=True, seed=0, data_seed=0,
    )
    options.update(overrides)
    return TrainingArguments(str(output_dir), **options)


def gmp(**overrides):
    options = dict(target_sparsity=0.75, start_step=0, end_step=4, update_every=1, exclude=["re:.*classifier.*"])
    options.update(overrides)
    return GradualMagnitudePruning(**options)


def pruned_weights(model, manager):
    names = list(manager.callbacks[0].weights)
    assert names, "the pruning callback targets no weight"
    return {name: model.get_submodule(name).weight.detach().clone() for name in names}


def test_callback_counts_real_updates_reaches_sparsity_and_logs(tmp_path):
    model = tiny_bert()
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    manager = CompressionManager(gmp())
    callback = CompressionCallback(manager)
    args = arguments(tmp_path, max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = Trainer(model=model, args=args, train_dataset=classification_data(), callbacks=[callback])
    trainer.train()

    assert len(forwards) == 12  # micro-batches
    assert manager.step == 6 and len(sparsities := manager.callbacks[0].layer_sparsities()) == 13  # 2 x 6 Linear + pooler
    assert manager.step == trainer.state.global_step == 6  # real updates
    sparsities = manager.callbacks[0].layer_sparsities()
    assert len(sparsities) == 13 and all(s == 0.75 for s in sparsities.values())
    assert trainer.callback_handler.callbacks[0] is callback  # ahead of the reporters
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and logged[-1]["compress/GradualMagnitudePruning/mask_sparsity"] == pytest.approx(0.75)


def train_run(output_dir, *, resume=None, save_steps=None, max_steps=8):
    model = tiny_bert()
    manager = CompressionManager(gmp(start_step=2, end_step=6, update_every=2))
    options = dict(save_strategy="steps", save_steps=save_steps) if save_steps else {}
    trainer = Trainer(
        model=model, args=arguments(output_dir, max_steps=max_steps, **options),
        train_dataset=classification_data(), callbacks=[CompressionCallback(manager)],
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, manager, trainer


def test_checkpoint_resume_restores_masks_and_matches_an_uninterrupted_run(tmp_path):
    model_a, manager_a, _ = train_run(tmp_path / "a", save_steps=4)
    checkpoint = tmp_path / "a" / "checkpoint-4"
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert state["step"] == 4
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 4

    moved = tmp_path / "elsewhere" / "checkpoint-4"  # a checkpoint outside the new run's output_dir
    shutil.copytree(checkpoint, moved)
    model_b, manager_b, _ = train_run(tmp_path / "b", resume=str(moved))

    assert manager_b.step == manager_a.step == 8
    masks_a = manager_a.state_dict()["callbacks"]["0:GradualMagnitudePruning"]["masks"]
    masks_b = manager_b.state_dict()["callbacks"]["0:GradualMagnitudePruning"]["masks"]
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    for name, weight in pruned_weights(model_a, manager_a).items():
        torch.testing.assert_close(pruned_weights(model_b, manager_b)[name], weight, rtol=0, atol=1e-6)
    assert manager_b.callbacks[0].overall_sparsity() == pytest.approx(0.75)


def test_resume_true_finds_the_last_checkpoint(tmp_path):
    train_run(tmp_path, save_steps=3, max_steps=3)
    _, manager, trainer = train_run(tmp_path, resume=True, max_steps=5)
    assert trainer.state.global_step == manager.step == 5


def test_resuming_from_a_checkpoint_without_compression_state_fails_clearly(tmp_path):
    train_run(tmp_path, save_steps=2, max_steps=2)
    (tmp_path / "checkpoint-2" / STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        train_run(tmp_path, resume=str(tmp_path / "checkpoint-2"))


def test_callback_rejects_a_non_manager():
    with pytest.raises(TypeError, match="`manager`"):
        CompressionCallback(gmp())


# ------------------------------------------------------------------------------ distillation
def agreement(student, teacher, data):
    ids = torch.stack([row["input_ids"] for row in data])
    student.eval()
    with torch.no_grad():
        s = student(input_ids=ids).logits
        t = teacher(input_ids=ids).logits
    student.train()
    return float(torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean"))


def test_distillation_trainer_trains_with_pruning_and_keeps_the_teacher_out_of_checkpoints(tmp_path):
    teacher = tiny_bert(seed=5, hidden=48)
    student = tiny_bert(seed=0)
    data = classification_data()
    before = agreement(student, teacher, data)
    distill = DistillationLoss(teacher, temperature=2.0, alpha=1.0)
    manager = CompressionManager(gmp(target_sparsity=0.5, start_step=5, end_step=10, update_every=5))
    trainer = DistillationTrainer(
        model=student, args=arguments(tmp_path, max_steps=30, save_strategy="steps", save_steps=30, learning_rate=3e-3),
        train_dataset=data, callbacks=[CompressionCallback(manager)], distillation=distill,
    )
    trainer.train()

    assert agreement(student, teacher, data) < 0.5 * before  # the student moved towards the teacher
    assert manager.callbacks[0].overall_sparsity() == pytest.approx(0.5)
    saved = load_file(tmp_path / "checkpoint-30" / "model.safetensors")
    assert set(saved) <= set(student.state_dict())  # the teacher (hidden 48) is not in it
    assert all(tensor.shape == student.state_dict()[key].shape for key, tensor in saved.items())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not ({id(p) for p in teacher.parameters()} & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]})
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert "distill/soft" in logged[-1]
    assert "eval_loss" in trainer.evaluate(data[:8])  # evaluation: the student's own loss


def token_batches():
    """Two micro-batches with different numbers of labelled tokens (-100 marks the rest)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (4, 10), generator=g)
    labels = torch.randint(0, 3, (4, 10), generator=g)
    labels[0, 2:] = -100  # 2 labelled tokens in the first micro-batch row ...
    labels[2, 7:] = -100
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(4)]


def test_token_level_loss_under_gradient_accumulation_equals_the_full_batch_loss(tmp_path):
    teacher = tiny_bert(BertForTokenClassification, seed=7, num_labels=3)
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    data = token_batches()

    def gradients(accumulation):
        student = tiny_bert(BertForTokenClassification, seed=0, num_labels=3)
        args = arguments(tmp_path, max_steps=1, learning_rate=0.0, per_device_train_batch_size=4 // accumulation,
                         gradient_accumulation_steps=accumulation, max_grad_norm=0.0)
        trainer = DistillationTrainer(model=student, args=args, train_dataset=data, distillation=distill)
        grads = {}
        for name, p in student.named_parameters():
            p.register_hook(lambda g, name=name: grads.__setitem__(name, grads.get(name, 0) + g))
        trainer.train()
        return grads

    full, accumulated = gradients(1), gradients(2)
    assert set(full) == set(accumulated)
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6)


def test_distillation_trainer_rejects_a_loss_without_teacher(tmp_path):
    with pytest.raises(TypeError, match="`distillation`"):
        DistillationTrainer(model=tiny_bert(), args=arguments(tmp_path), distillation=torch.nn.CrossEntropyLoss())


def test_updates_the_grad_scaler_skips_are_not_counted(tmp_path):
    """AMP: the Trainer's global_step (and on_optimizer_step) count skipped updates; the manager does not."""
    from transformers import TrainerCallback

    skipped_at = {2, 3}

    class OverflowAt(TrainerCallback):  # a CPU GradScaler whose scale is inf on chosen steps
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            self.scaler = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=10**6)
            trainer.accelerator.scaler = optimizer.scaler = self.scaler  # what accelerate sets up for fp16
            from accelerate.optimizer import patch_optimizer_step

            optimizer._accelerate_step_called = False
            optimizer._optimizer_original_step_method = optimizer.optimizer.step
            optimizer._optimizer_patched_step_method = patch_optimizer_step(optimizer, optimizer.optimizer.step)

        def on_step_begin(self, args, state, control, **kwargs):
            if self.scaler._scale is not None:
                self.scaler._scale.fill_(float("inf") if state.global_step in skipped_at else 1.0)

    manager = CompressionManager(gmp(start_step=0, end_step=2, update_every=1))
    trainer = Trainer(model=tiny_bert(), args=arguments(tmp_path, max_steps=6, max_grad_norm=0.0),
                      train_dataset=classification_data(), callbacks=[CompressionCallback(manager), OverflowAt()])
    trainer.train()
    assert trainer.state.global_step == 6
    assert manager.step == 6 - len(skipped_at)
    assert manager.callbacks[0].overall_sparsity() == pytest.approx(0.75)
