"""Transformers Trainer: CompressionCallback (updates, checkpoints, resume, logs) and DistillationTrainer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    Trainer,
    TrainingArguments,
)

from compress_callbacks import CompressionManager, DistillationLoss, FeatureDistillation, GradualMagnitudePruning
from compress_callbacks.integrations.transformers import (
    FEATURE_STATE_FILE,
    STATE_FILE,
    CompressionCallback,
    DistillationTrainer,
)

VOCAB = 100


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert(cls=BertForSequenceClassification, seed=0, hidden=32, num_labels=2, layers=2, **model_kwargs):
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * hidden,
        vocab_size=VOCAB, max_position_embeddings=32, num_labels=num_labels,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return cls(config, **model_kwargs)


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


def test_following_the_resume_advice_works_when_the_checkpoint_path_is_unknown(tmp_path, monkeypatch):
    import compress_callbacks.integrations.transformers as adapter

    model_a, manager_a, _ = train_run(tmp_path / "a", save_steps=4)
    checkpoint = tmp_path / "a" / "checkpoint-4"
    monkeypatch.setattr(adapter, "_running_training_call", lambda: (None, None))  # the Trainer hides the path
    with pytest.raises(ValueError, match=r"resumes at step 4.*manager.load_state_dict") as error:
        train_run(tmp_path / "b", resume=str(checkpoint))
    assert STATE_FILE in str(error.value)

    # the advice, literally: load the manager's state before trainer.train
    model = tiny_bert()
    manager = CompressionManager(gmp(start_step=2, end_step=6, update_every=2))
    manager.load_state_dict(torch.load(checkpoint / STATE_FILE, weights_only=True))
    trainer = Trainer(model=model, args=arguments(tmp_path / "b", max_steps=8), train_dataset=classification_data(),
                      callbacks=[CompressionCallback(manager)])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert manager.step == manager_a.step == 8
    for name, weight in pruned_weights(model_a, manager_a).items():
        torch.testing.assert_close(pruned_weights(model, manager)[name], weight, rtol=0, atol=1e-6)

    # a state of another step is no answer
    manager = CompressionManager(gmp(start_step=2, end_step=6, update_every=2))
    manager.load_state_dict({**torch.load(checkpoint / STATE_FILE, weights_only=True), "step": 2})
    trainer = Trainer(model=tiny_bert(), args=arguments(tmp_path / "c", max_steps=8), train_dataset=classification_data(),
                      callbacks=[CompressionCallback(manager)])
    with pytest.raises(ValueError, match="step 2"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_on_save_asks_every_rank_for_the_state_and_writes_on_rank_zero_only(tmp_path):
    """Under FSDP2 ``manager.state_dict()`` gathers masks from every rank: a rank that skipped it would
    leave rank 0 waiting forever."""
    from transformers import TrainerControl, TrainerState

    manager = CompressionManager(gmp())
    calls = []
    real_state_dict = manager.state_dict
    manager.state_dict = lambda: calls.append(1) or real_state_dict()
    callback = CompressionCallback(manager)
    args = arguments(tmp_path)
    (tmp_path / "checkpoint-3").mkdir()
    for rank_zero in (False, True):
        state = TrainerState(global_step=3, is_world_process_zero=rank_zero)
        callback.on_save(args, state, TrainerControl())
        assert len(calls) == 1 + rank_zero
        assert (tmp_path / "checkpoint-3" / STATE_FILE).exists() == rank_zero


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


# ------------------------------------------------------------------------------ feature distillation
def sentences(n=32, length=10, seed=4):
    """Unlabelled token sequences of uneven lengths (attention mask 0 on the padding)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        mask = (torch.arange(length) < 3 + (i * 7) % (length - 2)).long()
        rows.append({"input_ids": ids * mask, "attention_mask": mask})
    return rows


def embedding_distance(student, features, teacher, data):
    """Mean 1 - cosine between the projected mean-pooled student embedding and the teacher's."""
    ids = torch.stack([row["input_ids"] for row in data])
    mask = torch.stack([row["attention_mask"] for row in data])
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask).last_hidden_state
        t = teacher(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask[..., None].float()
        s, t = (s * weights).sum(1) / weights.sum(1), (t * weights).sum(1) / weights.sum(1)
        s = features.project(-1, s)
    return float((1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean())


def test_distillation_trainer_distils_a_sentence_embedding_student_without_labels(tmp_path):
    student = tiny_bert(BertModel, seed=0, hidden=16, layers=1)
    teacher = tiny_bert(BertModel, seed=5, hidden=32, layers=2)
    features = FeatureDistillation(student, teacher, layers=[-1], pooling="mean", loss="cosine")
    data = sentences()
    before = embedding_distance(student, features, teacher, data)
    trainer = DistillationTrainer(
        model=student, args=arguments(tmp_path, max_steps=30, learning_rate=3e-3, save_strategy="steps", save_steps=30),
        train_dataset=data, features=features,
    )
    trainer.train()

    assert embedding_distance(student, features, teacher, data) < 0.5 * before
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in features.parameters()} <= optimized
    assert not ({id(p) for p in teacher.parameters()} & optimized)
    saved = torch.load(tmp_path / "checkpoint-30" / FEATURE_STATE_FILE, weights_only=True)
    assert torch.equal(saved["projections.hidden_states_1.weight"], features.projections["hidden_states_1"].weight.cpu())
    assert set(load_file(tmp_path / "checkpoint-30" / "model.safetensors")) <= set(student.state_dict())
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["distill/feature/total"] < logged[0]["distill/feature/total"]


def hidden_state_mse(student, teacher, features, data):
    ids = torch.stack([row["input_ids"] for row in data])
    mask = torch.stack([row["attention_mask"] for row in data])
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
        t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        projected = features.project(1, s)
    return float(((projected - t)[mask.bool()] ** 2).mean())


def test_distillation_trainer_adds_hidden_state_losses_to_logit_distillation(tmp_path):
    student = tiny_bert(seed=0, hidden=16, layers=1)
    teacher = tiny_bert(seed=5, hidden=32, layers=2)
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    features = FeatureDistillation(student, teacher, layers=lambda i: 2 * i, loss="mse")
    labelled = classification_data(n=32, length=10)
    data = [{**row, **text} for row, text in zip(labelled, sentences())]  # padded and labelled
    batch = {key: torch.stack([row[key] for row in data]) for key in data[0]}
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    expected = distill(student(**inputs), batch["labels"], inputs=inputs) + 0.5 * features()  # the whole set at once
    before_mse = hidden_state_mse(student, teacher, features, data)
    first = DistillationTrainer(  # one step over the whole set, learning rate 0: its logged loss is the formula's
        model=student, args=arguments(tmp_path, max_steps=1, learning_rate=0.0, per_device_train_batch_size=32,
                                      logging_steps=1), train_dataset=data, distillation=distill, features=features,
        feature_weight=0.5,
    )
    first.train()
    assert first.state.log_history[0]["loss"] == pytest.approx(float(expected.detach()), rel=1e-5)

    trainer = DistillationTrainer(
        model=student, args=arguments(tmp_path, max_steps=30, learning_rate=3e-3), train_dataset=data,
        distillation=distill, features=features, feature_weight=0.5,
    )
    trainer.train()
    assert hidden_state_mse(student, teacher, features, data) < 0.5 * before_mse
    logged = [entry for entry in trainer.state.log_history if "loss" in entry][-1]
    assert {"distill/soft", "distill/hard", "distill/feature/hidden_states_1", "distill/feature/total"} <= set(logged)


def test_feature_loss_under_gradient_accumulation_equals_the_full_batch_loss(tmp_path):
    teacher = tiny_bert(BertForTokenClassification, seed=7, num_labels=3, layers=2)
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    rows = token_batches()
    lengths = [10, 3, 6, 9]  # uneven padding: the micro-batches hold 13 and 15 real tokens
    data = [{**row, "attention_mask": (torch.arange(10) < n).long()} for row, n in zip(rows, lengths)]

    def gradients(accumulation):
        student = tiny_bert(BertForTokenClassification, seed=0, hidden=16, num_labels=3, layers=1)
        features = FeatureDistillation(student, teacher, layers={1: 2, 0: 0})
        args = arguments(tmp_path, max_steps=1, learning_rate=0.0, per_device_train_batch_size=4 // accumulation,
                         gradient_accumulation_steps=accumulation, max_grad_norm=0.0)
        trainer = DistillationTrainer(model=student, args=args, train_dataset=data, distillation=distill, features=features)
        grads = {}
        named = [*student.named_parameters(), *(("features." + n, p) for n, p in features.named_parameters())]
        for name, p in named:
            p.register_hook(lambda g, name=name: grads.__setitem__(name, grads.get(name, 0) + g))
        trainer.train()
        return grads

    full, accumulated = gradients(1), gradients(2)
    assert set(full) == set(accumulated) and "features.projections.hidden_states_1.weight" in full
    for name in full:
        torch.testing.assert_close(accumulated[name], full[name], rtol=1e-4, atol=1e-6)


def feature_run(output_dir, *, resume=None, save_steps=None, max_steps=6):
    student = tiny_bert(BertModel, seed=0, hidden=16, layers=1)
    teacher = tiny_bert(BertModel, seed=5, hidden=32, layers=2)
    features = FeatureDistillation(student, teacher, layers=[-1], pooling="mean")
    options = dict(save_strategy="steps", save_steps=save_steps) if save_steps else {}
    trainer = DistillationTrainer(
        model=student, args=arguments(output_dir, max_steps=max_steps, learning_rate=3e-3, **options),
        train_dataset=sentences(), features=features,
    )
    trainer.train(resume_from_checkpoint=resume)
    return features


def test_resume_restores_the_projections_and_matches_an_uninterrupted_run(tmp_path):
    uninterrupted = feature_run(tmp_path / "a", save_steps=3)
    resumed = feature_run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    fresh = feature_run(tmp_path / "c", max_steps=3)  # what resuming without the projections would continue from
    weight = "projections.hidden_states_1.weight"
    torch.testing.assert_close(resumed.state_dict()[weight], uninterrupted.state_dict()[weight], rtol=0, atol=1e-6)
    assert not torch.allclose(fresh.state_dict()[weight], uninterrupted.state_dict()[weight])
    (tmp_path / "a" / "checkpoint-3" / FEATURE_STATE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=FEATURE_STATE_FILE):
        feature_run(tmp_path / "d", resume=str(tmp_path / "a" / "checkpoint-3"))


def test_projection_gradients_are_clipped_with_the_model_and_cleared_after_each_update(tmp_path):
    from transformers import TrainerCallback

    student = tiny_bert(BertModel, seed=0, hidden=16, layers=1)
    teacher = tiny_bert(BertModel, seed=5, hidden=32, layers=2)
    features = FeatureDistillation(student, teacher, layers=[-1])
    norms, leftovers = [], []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            leftovers.append(features.projections["hidden_states_1"].weight.grad)

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads = [p.grad for p in (*student.parameters(), *features.parameters()) if p.grad is not None]
            norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    trainer = DistillationTrainer(
        model=student, args=arguments(tmp_path, max_steps=4, max_grad_norm=0.01), train_dataset=sentences(),
        features=features, callbacks=[Watch()],
    )
    trainer.train()
    assert len(norms) == 4 and max(norms) <= 0.01 * (1 + 1e-4)
    assert all(grad is None for grad in leftovers)


def test_distillation_trainer_rejects_features_that_do_not_fit(tmp_path):
    student, teacher = tiny_bert(hidden=16, layers=1), tiny_bert(seed=5)
    features = FeatureDistillation(student, teacher, layers=[-1])
    args = arguments(tmp_path)
    with pytest.raises(TypeError, match="`distillation=.*`features="):
        DistillationTrainer(model=student, args=args)
    with pytest.raises(ValueError, match="`features` was built for another student"):
        DistillationTrainer(model=tiny_bert(hidden=16, layers=1), args=args, features=features)
    with pytest.raises(ValueError, match="share one teacher"):
        DistillationTrainer(model=student, args=args, features=features, distillation=DistillationLoss(tiny_bert(seed=6)))
    with pytest.raises(ValueError, match="`optimizers`"):
        DistillationTrainer(model=student, args=args, features=features,
                            optimizers=(torch.optim.SGD(student.parameters(), lr=0.1), None))
    with pytest.raises(ValueError, match="`feature_weight`"):
        DistillationTrainer(model=student, args=args, features=features, feature_weight=0)
    with pytest.raises(TypeError, match="`features`"):
        DistillationTrainer(model=student, args=args, features=torch.nn.MSELoss())


def _ddp_trainer_features_worker(path):
    student = tiny_bert(BertModel, seed=0, hidden=16, layers=1, add_pooling_layer=False)
    teacher = tiny_bert(BertModel, seed=5, hidden=32, layers=2)
    args = arguments(path, max_steps=2, learning_rate=1e-2, ddp_find_unused_parameters=False)
    torch.manual_seed(100 + args.process_index)  # different projections on each rank: rank 0's must be broadcast
    features = FeatureDistillation(student, teacher, layers=[-1], pooling="mean")
    initial = features.projections["hidden_states_1"].weight.detach().clone()
    trainer = DistillationTrainer(model=student, args=args, train_dataset=sentences(), features=features)
    trainer.train()
    weight = features.projections["hidden_states_1"].weight.detach()
    result = {"world": args.world_size, "weight": weight.flatten().tolist(), "initial": initial.flatten().tolist()}
    (Path(path) / f"rank{args.process_index}.json").write_text(json.dumps(result))


def test_projections_stay_identical_across_two_ddp_ranks_in_the_trainer(tmp_path, launch_two_processes):
    launch_two_processes(_ddp_trainer_features_worker, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["initial"] != ranks[1]["initial"]  # each rank drew its own
    assert ranks[0]["weight"] == ranks[1]["weight"]  # broadcast at wrapping, gradients averaged since
    assert ranks[0]["weight"] != ranks[0]["initial"]
