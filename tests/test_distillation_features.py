"""Feature distillation: hidden states and named modules of different depth and width, masks, pooling, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BertConfig, BertModel

from compress_callbacks import FeatureDistillation
from compress_callbacks.distillation import cosine_feature_loss, mse_feature_loss
from compress_callbacks.distillation.features import feature_loss, pool_features

VOCAB = 60

pytestmark = pytest.mark.usefixtures("one_thread")


def bert(hidden, layers, seed):
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=2 * hidden,
        vocab_size=VOCAB, max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertModel(config)


def student_and_teacher():
    """A student of half the teacher's depth and width."""
    return bert(16, 2, seed=0), bert(32, 4, seed=1)


def padded_batch(lengths=(7, 4, 9), length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), length), generator=g)
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids, mask


def run_both(student, teacher, ids, mask):
    out = student(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        teacher(input_ids=ids, attention_mask=mask)
    return out


def our_hooks(*models):
    """Hooks FeatureDistillation put on the models (Transformers installs its own for hidden states)."""
    hooks = [h for model in models for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]
    return sum(getattr(h, "__module__", "").startswith("compress_callbacks") for h in hooks)


# ------------------------------------------------------------------------------- pure functions
@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_feature_loss_averages_over_the_counted_positions_only(loss):
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 4, requires_grad=True), torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    errors = []
    for b in range(3):
        for p in range(5):
            if mask[b, p]:
                if loss == "mse":
                    errors.append(((s[b, p] - t[b, p]) ** 2).mean())
                else:
                    errors.append(1 - (s[b, p] @ t[b, p]) / (s[b, p].norm() * t[b, p].norm()))
    reference = torch.stack(errors).mean()
    value = feature_loss(s, t, loss, mask=mask)
    torch.testing.assert_close(value, reference)
    grad, = torch.autograd.grad(value, s)
    assert torch.all(grad[mask == 0] == 0) and torch.all(grad[mask == 1].abs().sum(-1) > 0)
    unmasked = mse_feature_loss(s, t) if loss == "mse" else cosine_feature_loss(s, t)
    torch.testing.assert_close(feature_loss(s, t, loss), unmasked)  # no mask: the losses.py functions
    nothing = feature_loss(s, t, loss, mask=torch.zeros_like(mask))
    assert float(nothing.detach()) == 0.0 and torch.all(torch.autograd.grad(nothing, s)[0] == 0)


def test_feature_loss_on_conv_features_uses_the_channel_dim():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    cos = F.cosine_similarity(s, t, dim=1)
    torch.testing.assert_close(feature_loss(s, t, "cosine", feature_dim=1), (1 - cos).mean())


def test_pool_features_masked_mean_and_cls_against_loops():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    reference = torch.stack([x[b, mask[b].bool()].mean(0) for b in range(3)])
    torch.testing.assert_close(pool_features(x, "mean", mask), reference)
    torch.testing.assert_close(pool_features(x, "mean"), x.mean(1))
    torch.testing.assert_close(pool_features(x, "cls"), x[:, 0])
    with pytest.raises(ValueError, match="attention_mask"):
        pool_features(x, "mean", mask[:, :4])
    with pytest.raises(ValueError, match="pooling"):
        pool_features(x, "max")


# ------------------------------------------------------------------------------- hidden states
@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_hidden_state_mapping_equals_a_reference_computation(loss):
    student, teacher = student_and_teacher()
    features = FeatureDistillation(student, teacher, layers=lambda i: 2 * i, loss=loss)
    assert features.pairs == [(0, 0), (1, 2), (2, 4)]  # student block i -> teacher block 2i + 1, embeddings too
    assert sorted(name for name, _ in features.named_parameters()) == [
        f"projections.hidden_states_{i}.weight" for i in range(3)
    ]
    ids, mask = padded_batch()
    run_both(student, teacher, ids, mask)
    value = features()

    s_states = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    with torch.no_grad():
        t_states = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    counted = mask.bool()
    per_pair = []
    for i in range(3):
        projected = s_states[i] @ features.projections[f"hidden_states_{i}"].weight.T
        a, b = projected[counted], t_states[2 * i][counted]  # [real tokens, 32]
        per_pair.append(((a - b) ** 2).mean() if loss == "mse" else (1 - F.cosine_similarity(a, b, dim=-1)).mean())
    torch.testing.assert_close(value, torch.stack(per_pair).mean(), rtol=1e-5, atol=1e-6)
    assert set(features.log_values()) == {*(f"feature/hidden_states_{i}" for i in range(3)), "feature/total"}

    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in features.parameters())
    assert student.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_padding_never_counts():
    """Padded copies of the same sequences (random pad tokens, mask 0) give the same loss as the unpadded batch."""
    student, teacher = student_and_teacher()
    for pooling in (None, "mean"):
        features = FeatureDistillation(student, teacher, layers={1: 2, -1: -1}, pooling=pooling)
        ids, _ = padded_batch(lengths=(5, 5), length=5)
        run_both(student, teacher, ids, torch.ones_like(ids))
        unpadded = features()
        padded = torch.cat([ids, torch.randint(1, VOCAB, (2, 4))], dim=1)
        mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 4, dtype=torch.long)], dim=1)
        run_both(student, teacher, padded, mask)
        torch.testing.assert_close(features(), unpadded, rtol=1e-5, atol=1e-6)
        run_both(student, teacher, padded, mask)
        unmasked = features(attention_mask=torch.ones_like(mask))  # counting the padding changes the loss
        assert abs(float(unmasked.detach()) - float(unpadded.detach())) > 1e-3
        features.remove()


def test_a_half_depth_half_width_bert_student_learns_the_teachers_hidden_states():
    student, teacher = student_and_teacher()
    features = FeatureDistillation(student, teacher, layers=lambda i: 2 * i if i else None, loss="mse")
    optimizer = torch.optim.Adam([*student.parameters(), *features.parameters()], lr=3e-3)
    ids, mask = padded_batch(lengths=(9, 6, 8, 3), seed=1)
    losses = []
    for _ in range(40):
        run_both(student, teacher, ids, mask)
        loss = features()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.4 * losses[0]


def test_a_transformers_block_width_is_read_from_its_output():
    """The issue's case: `encoder.layer.2` of a BERT has no width attribute; its output tells."""
    student, teacher = student_and_teacher()
    student.train()
    teacher.encoder.eval()
    modes = [m.training for model in (student, teacher) for m in model.modules()]
    features = FeatureDistillation(student, teacher, layers={"encoder.layer.1": "encoder.layer.2"})
    assert features.projections["encoder__layer__1"].weight.shape == (32, 16)
    assert modes == [m.training for model in (student, teacher) for m in model.modules()]  # restored after the probe
    ids, mask = padded_batch()
    run_both(student, teacher, ids, mask)
    s_out = student.encoder.layer[1]
    assert torch.isfinite(features())
    assert s_out.attention.output.LayerNorm.normalized_shape == (16,)
    with_inputs = FeatureDistillation(student, teacher, layers={"encoder.layer.1.intermediate": "encoder.layer.3.intermediate"},
                                      example_inputs={"input_ids": ids, "attention_mask": mask})
    assert with_inputs.projections["encoder__layer__1__intermediate"].weight.shape == (64, 32)


class Block(nn.Module):
    """A block with no width attribute (and BatchNorm, whose statistics a probe must not move)."""

    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, width), nn.BatchNorm1d(width))

    def forward(self, x):
        return torch.relu(self.body(x))


def test_example_inputs_read_widths_of_any_model_without_side_effects():
    student, teacher = nn.Sequential(Block(6), nn.Linear(6, 2)), nn.Sequential(Block(10), nn.Linear(10, 2))
    with pytest.raises(ValueError, match="widths"):
        FeatureDistillation(student, teacher, layers=["0"])
    stats = {k: v.clone() for k, v in student.state_dict().items()}
    features = FeatureDistillation(student, teacher, layers=["0"], example_inputs=torch.randn(8, 4))
    assert features.projections["0"].weight.shape == (10, 6)
    assert all(torch.equal(stats[k], v) for k, v in student.state_dict().items())  # BN running stats untouched
    assert student.training
    with pytest.raises(ValueError, match="example_inputs"):
        FeatureDistillation(student, teacher, layers=["0"], example_inputs=torch.randn(8, 5))  # wrong width


def test_state_dict_holds_the_projections_for_resume():
    student, teacher = student_and_teacher()
    first = FeatureDistillation(student, teacher, layers={1: 2, 2: 4})
    with torch.no_grad():
        for p in first.parameters():
            p.normal_()
    second = FeatureDistillation(student, teacher, layers={1: 2, 2: 4})
    assert list(second.state_dict()) == ["projections.hidden_states_1.weight", "projections.hidden_states_2.weight"]
    second.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    ids, mask = padded_batch()
    run_both(student, teacher, ids, mask)
    torch.testing.assert_close(first(), second())


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(layers={"encoder.layer.9": "encoder.layer.1"}), ValueError, "student has no module named 'encoder.layer.9'"),
        (dict(layers={"encoder.layer.1": "encoder.nope"}), ValueError, "teacher has no module named"),
        (dict(layers={3: 4}), ValueError, "out of range for the student, which has 3 hidden states"),
        (dict(layers={2: 5}), ValueError, "out of range for the teacher, which has 5"),
        (dict(layers={-4: 0}), ValueError, "out of range for the student"),
        (dict(layers=lambda i: 3 * i), ValueError, "out of range for the teacher"),
        (dict(layers=lambda i: "encoder.layer.0"), TypeError, "callable must return"),
        (dict(layers=[2, -1]), ValueError, "each student layer may appear once"),
        (dict(layers=[-1], projection=False), ValueError, "projection=False.*16 wide.*32"),
        (dict(layers=[1.5]), TypeError, "module name"),
        (dict(layers="encoder"), TypeError, "`layers`"),
        (dict(layers=[-1], pooling="max"), ValueError, "`pooling`"),
        (dict(layers=[-1], loss="l1"), ValueError, "`loss`"),
        (dict(layers=[-1], widths={-1: (16,)}), ValueError, "`widths`"),
        (dict(layers=[-1], widths={"encoder": (16, 32)}), ValueError, "`widths`: 'encoder' is not a student layer"),
        (dict(layers=[-1], widths={7: (16, 32)}), ValueError, "`widths`: 7 is not a student layer"),
    ],
)
def test_bad_input_raises_before_anything_is_touched(kwargs, error, match):
    student, teacher = student_and_teacher()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(error, match=match):
        FeatureDistillation(student, teacher, **kwargs)
    assert our_hooks(student, teacher) == 0
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_hidden_state_indices_need_a_transformers_model():
    plain = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="needs a Transformers"):
        FeatureDistillation(plain, nn.Sequential(nn.Linear(4, 4)), layers=[0])
    with pytest.raises(ValueError, match="Transformers"):
        FeatureDistillation(plain, nn.Sequential(nn.Linear(4, 4)), layers=lambda i: i)


def test_wrong_widths_or_masks_fail_clearly_at_the_call():
    student, teacher = student_and_teacher()
    features = FeatureDistillation(student, teacher, layers=[-1], widths={-1: (8, 32)})  # the student is 16 wide
    ids, mask = padded_batch()
    run_both(student, teacher, ids, mask)
    with pytest.raises(ValueError, match="`widths`.*16 wide"):
        features()
    features.remove()
    features = FeatureDistillation(student, teacher, layers=[-1])
    run_both(student, teacher, ids, mask)
    with pytest.raises(ValueError, match="`attention_mask` must have shape"):
        features(attention_mask=mask[:, :3])
    assert our_hooks(student, teacher) == 4  # pre-hook (mask) and hidden-states hook on each model
    features.remove()
    assert our_hooks(student, teacher) == 0
