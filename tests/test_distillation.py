"""Distillation: formulas against hand-written references, the teacher's handling, tokens, features, DDP."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_callbacks import CompressionManager, DistillationLoss, FeatureDistillation
from compress_callbacks.distillation import cosine_feature_loss, mse_feature_loss, soft_kd_loss, token_kd_losses


def reference_soft(student, teacher, temperature):
    """Textbook formula written out: T^2 * sum_c p_t (log p_t - log p_s), averaged over samples."""
    p_t = torch.softmax(teacher / temperature, dim=-1)
    log_p_s = torch.log(torch.softmax(student / temperature, dim=-1))
    kl_per_sample = (p_t * (torch.log(p_t) - log_p_s)).sum(-1)
    return temperature**2 * kl_per_sample.mean()


class Recorder(nn.Module):
    """A teacher that records how it was called."""

    def __init__(self, in_features=6, classes=5):
        super().__init__()
        self.linear = nn.Linear(in_features, classes)
        self.dropout = nn.Dropout(0.5)
        self.calls = []

    def forward(self, x=None, attention_mask=None, **kwargs):
        self.calls.append(
            {
                "grad_enabled": torch.is_grad_enabled(),
                "training": self.training,
                "autocast": torch.is_autocast_enabled(x.device.type),
                "kwargs": sorted(kwargs) + (["attention_mask"] if attention_mask is not None else []),
            }
        )
        return self.dropout(self.linear(x))


# ---------------------------------------------------------------------------- formulas
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_term_is_batchmean_kl_times_t_squared(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10) * 3
    ours = soft_kd_loss(student, teacher, temperature)
    torch.testing.assert_close(ours, reference_soft(student, teacher, temperature))
    torch.testing.assert_close(
        ours,
        temperature**2
        * F.kl_div(F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1), reduction="batchmean"),
    )


@pytest.mark.filterwarnings("ignore:reduction")
def test_not_the_kldivloss_mean_pitfall():
    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10), torch.randn(16, 10) * 3
    pitfall = nn.KLDivLoss()(F.log_softmax(student / 4, -1), F.softmax(teacher / 4, -1)) * 16  # 'mean': / (B*V)
    ours = soft_kd_loss(student, teacher, 4.0)
    torch.testing.assert_close(ours, pitfall * 10)  # ours is V times larger: per sample, not per element


def test_alpha_mixes_soft_and_hard_terms():
    torch.manual_seed(0)
    student, teacher, targets = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    distill = DistillationLoss(None, temperature=3.0, alpha=0.7)
    loss = distill(student, targets, teacher_outputs=teacher)
    expected = 0.7 * reference_soft(student, teacher, 3.0) + 0.3 * F.cross_entropy(student, targets)
    torch.testing.assert_close(loss, expected)
    values = distill.log_values()
    assert set(values) == {"hard", "soft", "total"} and all(isinstance(v, float) for v in values.values())
    assert values["total"] == pytest.approx(float(expected), rel=1e-6)
    assert values["hard"] == pytest.approx(float(F.cross_entropy(student, targets)), rel=1e-6)


def test_no_targets_gives_the_soft_term_alone_and_custom_base_loss():
    torch.manual_seed(0)
    student, teacher, targets = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    soft_only = DistillationLoss(None, temperature=2.0, alpha=0.5)(student, teacher_outputs=teacher)
    torch.testing.assert_close(soft_only, reference_soft(student, teacher, 2.0))
    base = lambda logits, y: F.multi_margin_loss(logits, y)  # noqa: E731
    mixed = DistillationLoss(None, base_loss=base, temperature=2.0, alpha=0.5)(student, targets, teacher_outputs=teacher)
    torch.testing.assert_close(mixed, 0.5 * reference_soft(student, teacher, 2.0) + 0.5 * base(student, targets))


def test_gradient_reaches_student_not_teacher_logits():
    student = torch.randn(4, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    DistillationLoss(None, temperature=2.0, alpha=0.9)(student, torch.tensor([0, 1, 2, 3]), teacher_outputs=teacher).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


# ---------------------------------------------------------------------------- the teacher
def test_teacher_frozen_eval_no_grad_and_outside_every_parent():
    teacher = Recorder()
    teacher.train()
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    student = nn.Linear(6, 5)
    parent = nn.ModuleDict({"student": student, "distill": distill})
    parent.train()
    teacher.train()  # even a direct .train() between calls is undone on the next call
    x = torch.randn(3, 6)
    distill(student(x), torch.tensor([0, 1, 2]), inputs=x).backward()
    call = teacher.calls[-1]
    assert call["grad_enabled"] is False and call["training"] is False
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert list(distill.parameters()) == [] and distill.state_dict() == {}
    assert not any(k.startswith("distill") for k in parent.state_dict())
    assert {id(p) for p in parent.parameters()} == {id(p) for p in student.parameters()}
    # deterministic teacher: dropout off, so two calls give the same soft term
    first = distill(student(x), inputs=x)
    assert torch.equal(first, distill(student(x), inputs=x))


def test_teacher_moves_to_the_students_device_on_first_use():
    teacher = nn.Linear(6, 5)
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    x = torch.randn(3, 6, device="meta")  # a device other than the teacher's, available everywhere
    loss = distill(torch.randn(3, 5, device="meta"), inputs=x)
    assert teacher.weight.device.type == "meta" and loss.device.type == "meta"


def test_dict_inputs_become_keyword_arguments_without_labels():
    teacher = Recorder()
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    x = torch.randn(3, 6)
    distill(torch.randn(3, 5), inputs={"x": x, "labels": torch.tensor([0, 1, 2]), "extra": 1})
    assert teacher.calls[-1]["kwargs"] == ["extra"]


@pytest.mark.parametrize(
    "wrap",
    [
        lambda t: SimpleNamespace(logits=t),
        lambda t: {"logits": t, "hidden": torch.zeros(1)},
        lambda t: (t, torch.zeros(1)),
    ],
    ids=["attribute", "dict", "tuple"],
)
def test_outputs_may_be_objects_dicts_or_tuples(wrap):
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    loss = DistillationLoss(None, temperature=2.0, alpha=1.0)(wrap(student), teacher_outputs=wrap(teacher))
    torch.testing.assert_close(loss, reference_soft(student, teacher, 2.0))


def test_output_loss_serves_as_the_hard_term():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5), torch.randn(4, 5)
    output = SimpleNamespace(logits=student, loss=torch.tensor(1.5))
    loss = DistillationLoss(None, temperature=2.0, alpha=0.6)(output, teacher_outputs=teacher)
    torch.testing.assert_close(loss, 0.6 * reference_soft(student, teacher, 2.0) + 0.4 * torch.tensor(1.5))
    ignored = DistillationLoss(None, temperature=2.0, alpha=0.6, use_output_loss=False)(output, teacher_outputs=teacher)
    torch.testing.assert_close(ignored, reference_soft(student, teacher, 2.0))


def test_bf16_autocast_on_cpu_runs_the_teacher_in_the_same_precision():
    torch.manual_seed(0)
    teacher, student = Recorder(), nn.Linear(6, 5)
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = student(x)
    assert logits.dtype == torch.bfloat16
    loss = distill(logits, y, inputs=x)  # outside autocast, as with Accelerate's wrapped forward
    assert teacher.calls[-1]["autocast"] is True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_inside = distill(student(x), y, inputs=x)
    assert teacher.calls[-1]["autocast"] is True
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(loss_inside)
    loss.backward()
    assert student.weight.grad is not None and torch.isfinite(student.weight.grad).all()
    distill(student(x), y, inputs=x)  # a float32 student: the teacher runs in float32
    assert teacher.calls[-1]["autocast"] is False


# ---------------------------------------------------------------------------- tokens
def test_token_level_ignore_index_and_padding_average_over_counted_positions():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, 1] = -100
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    keep = (targets != -100) & (mask != 0)
    distill = DistillationLoss(None, temperature=2.0, alpha=0.5)
    loss = distill(student, targets, teacher_outputs=teacher, attention_mask=mask)
    s, t, y = student[keep], teacher[keep], targets[keep]
    expected = 0.5 * reference_soft(s, t, 2.0) + 0.5 * F.cross_entropy(s, y)
    torch.testing.assert_close(loss, expected)
    # the attention mask may also come from the inputs dict
    from_inputs = distill(student, targets, inputs={"attention_mask": mask}, teacher_outputs=teacher)
    torch.testing.assert_close(from_inputs, expected)
    # a different ignore_index
    targets2 = targets.masked_fill(targets == -100, 0).masked_fill(~keep, -1)
    other = DistillationLoss(None, temperature=2.0, alpha=0.5, ignore_index=-1)(student, targets2, teacher_outputs=teacher)
    torch.testing.assert_close(other, 0.5 * reference_soft(s, t, 2.0) + 0.5 * F.cross_entropy(s, targets2[keep]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_token_kd_equals_unchunked_value_and_gradient(dtype):
    torch.manual_seed(0)
    base = torch.randn(3, 11, 13).to(dtype)
    teacher = torch.randn(3, 11, 13).to(dtype)
    targets = torch.randint(0, 13, (3, 11))
    targets[0, :4] = -100
    mask = torch.ones(3, 11)
    mask[2, 7:] = 0
    results = []
    for chunk in (None, 4, 1):
        student = base.clone().requires_grad_(True)
        soft, hard = token_kd_losses(student, teacher, 2.5, targets=targets, mask=mask, chunk_size=chunk)
        (0.8 * soft + 0.2 * hard).backward()
        results.append((soft.detach(), hard.detach(), student.grad))
    assert results[0][2].dtype == dtype
    for soft, hard, grad in results[1:]:
        torch.testing.assert_close(soft, results[0][0])
        torch.testing.assert_close(hard, results[0][1])
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.float(), results[0][2].float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)
    # against autograd of the written-out formula (float32 case)
    if dtype == torch.float32:
        student = base.clone().requires_grad_(True)
        keep = (targets != -100) & (mask != 0)
        (0.8 * reference_soft(student[keep], teacher[keep], 2.5) + 0.2 * F.cross_entropy(student[keep], targets[keep])).backward()
        torch.testing.assert_close(results[2][2], student.grad)


def test_chunked_soft_only_and_all_positions_ignored():
    torch.manual_seed(0)
    student = torch.randn(4, 6, 9, requires_grad=True)
    teacher = torch.randn(4, 6, 9)
    soft, hard = token_kd_losses(student, teacher, 2.0, chunk_size=5)
    assert hard is None
    torch.testing.assert_close(soft, reference_soft(student.reshape(-1, 9), teacher.reshape(-1, 9), 2.0))
    none_valid = torch.full((4, 6), -100)
    soft, hard = token_kd_losses(student, teacher, 2.0, targets=none_valid, chunk_size=5)
    (soft + hard).backward()
    assert float(soft.detach()) == 0.0 and float(hard.detach()) == 0.0 and float(student.grad.abs().sum()) == 0.0


def test_transformers_causal_lm_shift_labels_matches_the_models_own_loss():
    import transformers  # a test dependency (pyproject [test])
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    student = transformers.GPT2LMHeadModel(config)
    teacher = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 50, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    out = student(**batch)
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.0, shift_labels=True, chunk_size=3)
    ours = distill(out, labels, inputs=batch)
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-5)
    # with .loss as the hard term (targets=None) the soft term still uses the padding mask
    distill_soft = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    total = distill_soft(out, inputs=batch)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    soft = reference_soft(out.logits[keep], t_logits[keep], 2.0)
    torch.testing.assert_close(total, 0.5 * soft + 0.5 * out.loss, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- errors
def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(None, temperature=0.0, alpha=0.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(None, temperature=-1, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(None, temperature=1.0, alpha=1.5)
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(None, temperature=1.0, alpha=-0.1)
    with pytest.raises(ValueError, match="chunk_size"):
        DistillationLoss(None, temperature=1.0, alpha=0.5, chunk_size=0)
    distill = DistillationLoss(None, temperature=1.0, alpha=0.5)
    with pytest.raises(ValueError, match="teacher_outputs"):
        distill(torch.randn(4, 5), teacher_outputs=torch.randn(4, 6))  # vocabulary
    with pytest.raises(ValueError, match="teacher_outputs"):
        distill(torch.randn(4, 5), teacher_outputs=torch.randn(3, 5))  # batch
    with pytest.raises(ValueError, match="teacher_outputs"):
        distill(torch.randn(4, 5))  # no teacher at all
    with pytest.raises(ValueError, match="targets"):
        distill(torch.randn(4, 5), torch.zeros(3, dtype=torch.long), teacher_outputs=torch.randn(4, 5))
    with pytest.raises(TypeError, match="student_outputs"):
        distill("logits", teacher_outputs=torch.randn(4, 5))


def test_log_values_flow_into_the_managers_logs():
    from compress_callbacks import GradualMagnitudePruning

    manager = CompressionManager(GradualMagnitudePruning(target_sparsity=0.5, start_step=0, end_step=2, update_every=1))
    distill = manager.register_loss(DistillationLoss(None, temperature=2.0, alpha=0.5))
    distill(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), teacher_outputs=torch.randn(4, 5))
    logged = manager.collect_log_values()
    assert {f"compress/DistillationLoss/{k}" for k in ("hard", "soft", "total")} <= set(logged)
    assert logged["compress/DistillationLoss/total"] == pytest.approx(distill.log_values()["total"])


# ---------------------------------------------------------------------------- features
def _feature_models():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    return student, teacher


def test_feature_losses_against_references():
    torch.manual_seed(0)
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(mse_feature_loss(a, b), ((a - b) ** 2).mean())
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(cosine_feature_loss(a, b), (1 - cos).mean())
    with pytest.raises(ValueError, match="projection"):
        mse_feature_loss(a, torch.randn(4, 6))


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_feature_distillation_learns_a_projection(loss):
    student, teacher = _feature_models()
    features = FeatureDistillation(student, teacher, layers={"0": "0"}, loss=loss)
    assert [name for name, _ in features.named_parameters()] == ["projections.0.weight"]
    optimizer = torch.optim.Adam([*student.parameters(), *features.parameters()], lr=0.05)
    x = torch.randn(32, 6)
    losses = []
    for _ in range(25):
        student(x)
        with torch.no_grad():
            teacher(x)
        value = features()
        losses.append(float(value.detach()))
        value.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.5 * losses[0]
    assert set(features.log_values()) == {"feature/0", "feature/total"}
    with pytest.raises(ValueError, match="captured"):
        features()  # activations are consumed by each call
    features.remove()
    student(x)
    with pytest.raises(ValueError, match="captured"):
        features()


def test_feature_distillation_with_distillation_loss_and_errors():
    student, teacher = _feature_models()
    same = FeatureDistillation(student, teacher, layers=["2"], projection="auto")
    assert len(same.projections) == 0  # equal widths: no projection
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    x = torch.randn(5, 6)
    logits = student(x)
    loss = distill(logits, torch.zeros(5, dtype=torch.long), inputs=x) + same()
    loss.backward()
    torch.testing.assert_close(same.log_values()["feature/total"], float(((logits - teacher(x)) ** 2).mean().detach()))
    with pytest.raises(ValueError, match="layers"):
        FeatureDistillation(student, teacher, layers={"nope": "0"})
    with pytest.raises(ValueError, match="loss"):
        FeatureDistillation(student, teacher, layers=["0"], loss="l1")
    with pytest.raises(ValueError, match="widths"):
        FeatureDistillation(student, teacher, layers=["1"], projection=True)  # ReLU has no width
    conv_s, conv_t = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 8, 1)
    conv = FeatureDistillation(nn.Sequential(conv_s), nn.Sequential(conv_t), layers=["0"], feature_dim=1)
    image = torch.randn(2, 3, 5, 5)
    conv_s(image), conv_t(image)
    assert torch.isfinite(conv())


def _ddp_features_worker(path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(100 + rank)  # different initialisations: DDP must broadcast rank 0's
    student, teacher = _feature_models()
    torch.manual_seed(7)
    teacher = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    features = FeatureDistillation(student, teacher, layers={"0": "0"})
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    optimizer = torch.optim.SGD([*student.parameters(), *features.parameters()], lr=0.1)
    model, features_ddp, optimizer = accelerator.prepare(student, features, optimizer)
    initial = features.projections["0"].weight.detach().clone()
    assert not any(p is q for p in teacher.parameters() for q in model.parameters())
    torch.manual_seed(1000 + rank)  # different data on each rank
    for _ in range(3):
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        loss = distill(model(x), y, inputs=x) + features_ddp()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    weight = features.projections["0"].weight.detach()
    gathered = accelerator.gather(weight[None])
    assert not torch.equal(weight, initial)
    with open(os.path.join(path, f"rank{rank}.json"), "w") as handle:
        json.dump({"identical": bool(torch.equal(gathered[0], gathered[1])), "weight": weight.flatten()[:4].tolist()}, handle)


def test_feature_projection_stays_identical_across_two_ddp_ranks(tmp_path, launch_two_processes):
    launch_two_processes(_ddp_features_worker, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["identical"] for r in results)
    assert results[0]["weight"] == results[1]["weight"]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 2.5, 3.0, 4.0])
@pytest.mark.parametrize("chunk", [None, 4])
def test_fused_token_kd_loss_matches_autograd_of_the_formula(temperature, chunk):
    from compress_callbacks.distillation import token_kd_loss

    torch.manual_seed(0)
    base = torch.randn(3, 7, 11) * 4  # wide logits: the integer-T power path must stay accurate
    teacher = torch.randn(3, 7, 11) * 4
    targets = torch.randint(0, 11, (3, 7))
    targets[1, 2:5] = -100
    keep = targets != -100
    student = base.clone().requires_grad_(True)
    total, soft, hard = token_kd_loss(student, teacher, temperature, 0.7, targets=targets, chunk_size=chunk)
    total.backward()
    assert not soft.requires_grad and not hard.requires_grad
    reference = base.clone().requires_grad_(True)
    ref_soft = reference_soft(reference[keep], teacher[keep], temperature)
    ref_hard = F.cross_entropy(reference[keep], targets[keep])
    (0.7 * ref_soft + 0.3 * ref_hard).backward()
    torch.testing.assert_close(soft, ref_soft.detach())
    torch.testing.assert_close(hard, ref_hard.detach())
    torch.testing.assert_close(total.detach(), (0.7 * ref_soft + 0.3 * ref_hard).detach())
    torch.testing.assert_close(student.grad, reference.grad)


# ---------------------------------------------------------------------------- real input (issue 14)
def test_base_loss_receives_regression_and_embedding_targets_untouched():
    torch.manual_seed(0)
    # embedding distillation: outputs [B, D], targets [B, D] (not class labels of the leading shape)
    student, teacher, embeddings = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6), torch.randn(4, 6)
    seen = []

    def mse(outputs, targets):
        seen.append(targets)
        return nn.MSELoss()(outputs, targets)

    loss = DistillationLoss(None, base_loss=mse, temperature=2.0, alpha=0.5)(student, embeddings, teacher_outputs=teacher)
    assert seen[-1] is embeddings
    torch.testing.assert_close(loss, 0.5 * reference_soft(student, teacher, 2.0) + 0.5 * F.mse_loss(student, embeddings))
    loss.backward()
    assert torch.isfinite(student.grad).all()
    # regression values of the leading shape: a value equal to ignore_index is a value, not an ignored row
    values = torch.tensor([0.5, -100.0, 3.0, 1.0])
    head = lambda outputs, y: F.mse_loss(outputs.mean(-1), y)  # noqa: E731
    loss = DistillationLoss(None, base_loss=head, temperature=2.0, alpha=0.5)(student, values, teacher_outputs=teacher)
    torch.testing.assert_close(loss, 0.5 * reference_soft(student, teacher, 2.0) + 0.5 * head(student, values))
    # the default cross-entropy needs class labels: other targets are refused, naming `targets` and `base_loss`
    with pytest.raises(ValueError, match="targets.*base_loss"):
        DistillationLoss(None, temperature=2.0)(student, embeddings, teacher_outputs=teacher)


def test_student_teacher_shape_mismatch_says_shape():
    distill = DistillationLoss(None, temperature=1.0, alpha=0.5)
    with pytest.raises(ValueError, match="shape"):
        distill(torch.randn(4, 5), teacher_outputs=torch.randn(4, 6))
    with pytest.raises(ValueError, match="shape"):
        distill(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), teacher_outputs=torch.randn(2, 4, 5))


@pytest.mark.parametrize("bad", [-1, -7, 5])
def test_labels_outside_the_vocabulary_other_than_ignore_index_raise_naming_the_value(bad):
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.tensor([[0, -100, 2], [3, bad, 4]])
    with pytest.raises(ValueError, match=rf"targets.*{bad}"):
        DistillationLoss(None, temperature=2.0, alpha=0.5)(student, labels, teacher_outputs=teacher)
    # also where the labels only mark the counted positions (a custom base loss)
    custom = DistillationLoss(None, base_loss=lambda s, y: s.sum() * 0, temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match=rf"targets.*{bad}"):
        custom(student, labels, teacher_outputs=teacher)
    fine = labels.masked_fill(labels == bad, -100)
    assert torch.isfinite(DistillationLoss(None, temperature=2.0, alpha=0.5)(student, fine, teacher_outputs=teacher))


@pytest.mark.parametrize("chunk", [None, 2])
def test_minus_inf_logits_shared_by_student_and_teacher_contribute_nothing(chunk):
    from compress_callbacks.distillation import token_kd_loss

    torch.manual_seed(0)
    vocab, padded = 7, 3  # a vocabulary padded by 3 entries that both models mask with -inf
    base, teacher = torch.randn(2, 4, vocab + padded), torch.randn(2, 4, vocab + padded)
    base[..., vocab:] = float("-inf")
    teacher[..., vocab:] = float("-inf")
    targets = torch.randint(0, vocab, (2, 4))
    student = base.clone().requires_grad_(True)
    total, soft, hard = token_kd_loss(student, teacher, 2.0, 0.7, targets=targets, chunk_size=chunk)
    total.backward()
    reference = base[..., :vocab].clone().requires_grad_(True)
    ref_soft = reference_soft(reference.reshape(-1, vocab), teacher[..., :vocab].reshape(-1, vocab), 2.0)
    ref_total = 0.7 * ref_soft + 0.3 * F.cross_entropy(reference.reshape(-1, vocab), targets.reshape(-1))
    ref_total.backward()
    assert torch.isfinite(total) and torch.isfinite(student.grad).all()
    torch.testing.assert_close(soft, ref_soft.detach())
    torch.testing.assert_close(total.detach(), ref_total.detach())
    torch.testing.assert_close(student.grad[..., :vocab], reference.grad)
    assert torch.equal(student.grad[..., vocab:], torch.zeros(2, 4, padded))


def reference_soft64(student, teacher, temperature):
    return temperature**2 * F.kl_div(torch.log_softmax(student.double() / temperature, -1),
                                     torch.log_softmax(teacher.double() / temperature, -1), reduction="batchmean", log_target=True)


@pytest.mark.parametrize("temperature", [64.0, 1e4, 1e6])
def test_large_temperatures_are_computed_precisely(temperature):
    torch.manual_seed(0)
    base, teacher = torch.randn(8, 50), torch.randn(8, 50)
    student = base.clone().requires_grad_(True)
    loss = DistillationLoss(None, temperature=temperature, alpha=1.0)(student, teacher_outputs=teacher)
    loss.backward()
    if temperature < 1e5:  # float64 autograd of the formula is still exact enough to compare with
        reference = base.double().requires_grad_(True)
        expected = reference_soft64(reference, teacher, temperature)
        expected.backward()
        expected, expected_grad = float(expected.detach()), reference.grad
    else:  # the T -> inf limit: half the variance of the logit difference, averaged over rows
        difference = (teacher - base).double()
        centred = difference - difference.mean(-1, keepdim=True)
        expected = float(0.5 * centred.pow(2).mean(-1).mean())
        expected_grad = -centred / (50 * 8)
    assert float(loss.detach()) > 0
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(student.grad.double(), expected_grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), 1e7, 0.0])
def test_non_finite_or_out_of_range_temperatures_are_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(None, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        soft_kd_loss(torch.randn(2, 3), torch.randn(2, 3), temperature)


def test_a_teacher_sharing_parameters_with_the_student_is_refused_and_never_freezes_the_student():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    student = nn.Sequential(teacher[0], nn.ReLU(), nn.Linear(8, 5))  # layer 0 reused, not copied
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    assert all(p.requires_grad for p in student.parameters())
    x, y = torch.randn(3, 6), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"teacher.*shares.*0\.weight"):
        distill(student(x), y, inputs=x)
    assert all(p.requires_grad for p in student.parameters())  # nothing was frozen
    # a frozen shared part (e.g. a frozen base under adapters) is fine: nothing of the student gets frozen
    teacher[0].requires_grad_(False)
    frozen_base = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    frozen_base(student(x), y, inputs=x).backward()
    assert student[2].weight.requires_grad and student[2].weight.grad is not None
    assert not any(p.requires_grad for p in teacher.parameters())
    # a student that is a deep copy shares nothing
    import copy

    separate = copy.deepcopy(teacher).requires_grad_(True)
    DistillationLoss(teacher, temperature=2.0, alpha=0.5)(separate(x), y, inputs=x).backward()
    assert all(p.requires_grad and p.grad is not None for p in separate.parameters())
