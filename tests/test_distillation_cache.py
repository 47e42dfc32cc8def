"""Divergences against written-out references, and cached top-k teacher logits (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_callbacks import DistillationLoss
from compress_callbacks.distillation import (
    TopKLogits,
    cache_teacher_logits,
    load_teacher_logits,
    token_kd_loss,
    token_kd_losses,
)

DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]
IDS = ["forward_kl", "reverse_kl", "jsd", "jsd-beta0.2"]


def divergence_per_row(log_p, log_q, divergence, beta):
    """The issue's definitions written out, over the last dim (p: student, q: teacher)."""
    p, q = log_p.exp(), log_q.exp()
    kl = lambda a, log_a, log_b: torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)  # noqa: E731
    if divergence == "forward_kl":
        return kl(q, log_q, log_p)
    if divergence == "reverse_kl":
        return kl(p, log_p, log_q)
    log_m = torch.log(beta * q + (1 - beta) * p)
    return beta * kl(q, log_q, log_m) + (1 - beta) * kl(p, log_p, log_m)


def reference_soft(student, teacher, temperature, divergence, beta, keep):
    """T^2 * mean over the kept positions of D(softmax(student / T), softmax(teacher / T)), in float64."""
    log_p = torch.log_softmax(student.double() / temperature, -1)[keep]
    log_q = torch.log_softmax(teacher.double() / temperature, -1)[keep]
    return temperature**2 * divergence_per_row(log_p, log_q, divergence, beta).mean()


def reference_top_k_soft(student, teacher, top_k, temperature, divergence, beta, keep):
    """The same over k + 1 outcomes: the teacher's k largest tokens and one bucket for all the others."""
    p = torch.softmax(student.double() / temperature, -1)[keep]
    q = torch.softmax(teacher.double() / temperature, -1)[keep]
    index = teacher[keep].topk(top_k, -1).indices
    others = torch.ones_like(p, dtype=torch.bool).scatter_(-1, index, False)
    bucket = lambda x: torch.cat([x.gather(-1, index), (x * others).sum(-1, keepdim=True)], -1)  # noqa: E731
    return temperature**2 * divergence_per_row(bucket(p).log(), bucket(q).log(), divergence, beta).mean()


def token_data(seed=0, vocab=11):
    torch.manual_seed(seed)
    student, teacher = torch.randn(3, 7, vocab) * 2, torch.randn(3, 7, vocab) * 2
    targets = torch.randint(0, vocab, (3, 7))
    targets[1, 2:5] = -100
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[2, 5:] = 0
    return student, teacher, targets, mask, (targets != -100) & (mask != 0)


# ---------------------------------------------------------------------------- divergences
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=IDS)
@pytest.mark.parametrize("chunk", [None, 4])
@pytest.mark.parametrize("temperature", [1.0, 2.5, 64.0])
def test_each_divergence_matches_the_written_out_formula(divergence, beta, chunk, temperature):
    base, teacher, targets, mask, keep = token_data()
    student = base.clone().requires_grad_(True)
    total, soft, hard = token_kd_loss(student, teacher, temperature, 0.7, targets=targets, mask=mask, chunk_size=chunk,
                                      divergence=divergence, beta=beta)
    total.backward()
    reference = base.double().requires_grad_(True)
    ref_soft = reference_soft(reference, teacher, temperature, divergence, beta, keep)
    ref_total = 0.7 * ref_soft + 0.3 * F.cross_entropy(reference[keep], targets[keep])
    ref_total.backward()
    torch.testing.assert_close(soft.double(), ref_soft.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.detach().double(), ref_total.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), reference.grad, rtol=1e-4, atol=1e-6)
    # the separately differentiable pair agrees
    student.grad = None
    soft_alone, _ = token_kd_losses(student, teacher, temperature, targets=targets, mask=mask, chunk_size=chunk,
                                    divergence=divergence, beta=beta)
    soft_alone.backward()
    reference.grad = None
    reference_soft(reference, teacher, temperature, divergence, beta, keep).backward()
    torch.testing.assert_close(student.grad.double(), reference.grad, rtol=1e-4, atol=1e-6)


def test_the_divergences_differ_and_distillation_loss_passes_them_on():
    base, teacher, targets, mask, keep = token_data(1)
    values = {}
    for divergence, beta in DIVERGENCES:
        distill = DistillationLoss(None, temperature=2.0, alpha=1.0, divergence=divergence, beta=beta)
        values[(divergence, beta)] = float(distill(base, targets, teacher_outputs=teacher, attention_mask=mask))
        assert values[(divergence, beta)] == pytest.approx(float(reference_soft(base, teacher, 2.0, divergence, beta, keep)), rel=1e-5)
    assert len({round(v, 6) for v in values.values()}) == len(values)
    assert "divergence='jsd', beta=0.2" in repr(DistillationLoss(None, divergence="jsd", beta=0.2))


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=IDS)
def test_minus_inf_entries_shared_by_both_weigh_nothing_in_every_divergence(divergence, beta):
    base, teacher, targets, _, _ = token_data(2, vocab=9)
    padded_student = torch.cat([base, torch.full((3, 7, 3), float("-inf"))], -1).requires_grad_(True)
    padded_teacher = torch.cat([teacher, torch.full((3, 7, 3), float("-inf"))], -1)
    total, _, _ = token_kd_loss(padded_student, padded_teacher, 2.0, 0.5, targets=targets, divergence=divergence, beta=beta)
    total.backward()
    student = base.clone().requires_grad_(True)
    expected, _, _ = token_kd_loss(student, teacher, 2.0, 0.5, targets=targets, divergence=divergence, beta=beta)
    expected.backward()
    torch.testing.assert_close(total.detach(), expected.detach())
    torch.testing.assert_close(padded_student.grad[..., :9], student.grad)
    assert torch.equal(padded_student.grad[..., 9:], torch.zeros(3, 7, 3))


@pytest.mark.parametrize("kwargs,name", [({"divergence": "kl"}, "divergence"), ({"divergence": "jsd", "beta": 0.0}, "beta"),
                                         ({"divergence": "jsd", "beta": 1.0}, "beta"), ({"beta": "half"}, "beta")])
def test_bad_divergence_arguments_are_refused(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DistillationLoss(None, **kwargs)
    with pytest.raises(ValueError, match=name):
        token_kd_loss(torch.randn(2, 3), torch.randn(2, 3), 1.0, 0.5, **kwargs)


# ---------------------------------------------------------------------------- a small LM teacher and its cache
class TinyLM(nn.Module):
    """Embedding -> Linear, logits [B, T, V]; records the modes it ran in."""

    def __init__(self, vocab=40, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, labels=None):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return {"logits": self.head(torch.tanh(self.embed(input_ids))) * 3}


def lm_batches(count=3, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for number in range(count):
        ids = torch.randint(0, vocab, (2, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6 - number:] = 0  # padding at the end of the second row (none in the first batch)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=IDS)
def test_top_k_of_the_whole_vocabulary_equals_the_full_logit_loss(tmp_path, divergence, beta):
    teacher, student = TinyLM(seed=1), TinyLM(seed=2)
    batches = lm_batches()
    cache = cache_teacher_logits(teacher, batches, tmp_path / "t.topk", top_k=40, value_dtype=torch.float32)
    live = DistillationLoss(teacher, temperature=2.0, alpha=0.6, shift_labels=True, divergence=divergence, beta=beta)
    cached = DistillationLoss(None, temperature=2.0, alpha=0.6, shift_labels=True, divergence=divergence, beta=beta)
    for batch, entry in cache.zip(batches):
        expected = live(student(**batch), batch["labels"], inputs=batch)
        expected.backward()
        expected_grads = [p.grad.clone() for p in student.parameters()]
        student.zero_grad()
        loss = cached(student(**batch), batch["labels"], inputs=batch, teacher_outputs=entry)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        for parameter, grad in zip(student.parameters(), expected_grads):
            torch.testing.assert_close(parameter.grad, grad, rtol=1e-4, atol=1e-6)
        student.zero_grad()


def test_left_padding_keeps_the_position_that_predicts_the_first_token(tmp_path):
    teacher, student = TinyLM(seed=1), TinyLM(seed=2)
    ids = torch.randint(0, 40, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    cache = cache_teacher_logits(teacher, [batch], tmp_path / "t.topk", top_k=40, value_dtype=torch.float32)
    assert cache[0].counted[0].tolist() == [False, True, True, True, True, True]  # position 1 predicts token 2
    live = DistillationLoss(teacher, temperature=1.0, alpha=0.5, shift_labels=True)(student(**batch), batch["labels"], inputs=batch)
    cached = DistillationLoss(None, temperature=1.0, alpha=0.5, shift_labels=True)(
        student(**batch), batch["labels"], inputs=batch, teacher_outputs=cache[0])
    torch.testing.assert_close(cached, live)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=IDS)
@pytest.mark.parametrize("chunk", [None, 3])
def test_fewer_than_the_vocabulary_is_the_k_plus_one_outcome_divergence(tmp_path, divergence, beta, chunk):
    teacher = TinyLM(seed=1)
    batches = lm_batches()
    cache = cache_teacher_logits(teacher, batches, tmp_path / "t.topk", top_k=6, temperature=2.0, value_dtype=torch.float32)
    torch.manual_seed(5)
    for batch, entry in cache.zip(batches):
        base = torch.randn(2, 6, 40) * 2
        with torch.no_grad():
            teacher_logits = teacher(**batch)["logits"]
        keep = batch["attention_mask"] != 0
        student = base.clone().requires_grad_(True)
        soft, _ = token_kd_losses(student, entry, 2.0, mask=batch["attention_mask"], chunk_size=chunk, divergence=divergence,
                                  beta=beta)
        soft.backward()
        reference = base.double().requires_grad_(True)
        expected = reference_top_k_soft(reference, teacher_logits, 6, 2.0, divergence, beta, keep)
        expected.backward()
        torch.testing.assert_close(soft.double(), expected.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(student.grad.double(), reference.grad, rtol=1e-4, atol=1e-7)
        assert torch.isfinite(student.grad).all()
        if divergence == "forward_kl":  # merging outcomes never increases a KL
            assert float(soft.detach()) <= float(reference_soft(base, teacher_logits, 2.0, divergence, beta, keep)) + 1e-6


def test_a_top_k_teacher_without_tail_is_the_renormalised_top_k():
    torch.manual_seed(0)
    base, teacher = torch.randn(5, 12), torch.randn(5, 12)
    values, indices = teacher.topk(4)
    student = base.clone().requires_grad_(True)
    soft, _ = token_kd_losses(student, TopKLogits(values, indices), 1.0)
    soft.backward()
    assert torch.isfinite(student.grad).all()
    # the teacher is renormalised over its k tokens; the student keeps an outcome for "any other"
    q = torch.softmax(values.double(), -1)
    p = torch.softmax(base.double(), -1)
    expected = (q * (q.log() - p.gather(-1, indices).log())).sum(-1).mean()
    torch.testing.assert_close(soft.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_cache_file_is_small_read_lazily_and_holds_the_teachers_top_k(tmp_path):
    teacher = TinyLM(vocab=1000, seed=3)
    batches = lm_batches(vocab=1000)
    cache = cache_teacher_logits(teacher, batches, tmp_path / "t.topk", top_k=64)
    assert cache.positions == sum(int(b["attention_mask"].sum()) for b in batches)
    assert cache.bytes_per_position <= 512 and cache.vocab_size == 1000 and cache.top_k == 64
    reopened = load_teacher_logits(tmp_path / "t.topk")
    assert len(reopened) == 3 and "bytes per position" in repr(reopened)
    import pickle

    pickled = pickle.dumps(reopened)  # DataLoader workers get the path, not the data
    assert len(pickled) < 2000 and torch.equal(pickle.loads(pickled)[2].indices, reopened[2].indices)
    for batch, entry in zip(batches, reopened):
        with torch.no_grad():
            logits = teacher(**batch)["logits"]
        keep = batch["attention_mask"] != 0
        assert entry.values.dtype == torch.float16 and entry.shape == (2, 6)
        assert torch.equal(entry.counted, keep) if entry.counted is not None else bool(keep.all())
        top = logits[keep].topk(64)
        assert torch.equal(entry.indices[keep], top.indices)
        shifted = top.values - top.values[:, :1]
        torch.testing.assert_close(entry.values[keep].float(), shifted, rtol=1e-3, atol=1e-2)
        rest = (logits[keep] - top.values[:, :1]).scatter(-1, top.indices, float("-inf"))
        torch.testing.assert_close(entry.log_tail[keep], torch.logsumexp(rest, -1))
    # lazy: an entry is read from the file when asked for, not when the cache is opened
    data = bytearray((tmp_path / "t.topk").read_bytes())
    start = reopened._entries[2]["offset"]
    data[start:start + 2] = np.float16(-1.5).tobytes()  # the first value of batch 2
    (tmp_path / "t.topk").write_bytes(bytes(data))
    assert float(reopened[2].values.reshape(-1, 64)[0, 0]) == -1.5


def test_bfloat16_values_round_trip(tmp_path):
    teacher = TinyLM(seed=4)
    cache = cache_teacher_logits(teacher, lm_batches(1), tmp_path / "t.topk", top_k=8, value_dtype=torch.bfloat16)
    entry = cache[0]
    with torch.no_grad():
        logits = teacher(**lm_batches(1)[0])["logits"]
    top = logits.topk(8)
    assert entry.values.dtype == torch.bfloat16
    torch.testing.assert_close(entry.values.float(), (top.values - top.values[..., :1]).bfloat16().float())


def test_teacher_runs_once_in_eval_without_grad_and_gets_its_mode_back(tmp_path, capfd):
    teacher = TinyLM()
    teacher.train()
    cache_teacher_logits(teacher, lm_batches(), tmp_path / "t.topk", top_k=4)
    assert teacher.calls == [(False, False)] * 3 and teacher.training
    assert "teacher logits" not in capfd.readouterr().err  # no progress bar off a terminal
    cache_teacher_logits(teacher, lm_batches(), tmp_path / "u.topk", top_k=4, progress=True)
    assert "teacher logits" in capfd.readouterr().err
    # `inputs`: a key, or a callable
    plain = nn.Linear(4, 10)
    data = [{"x": torch.randn(3, 4), "y": torch.zeros(3)} for _ in range(2)]
    by_key = cache_teacher_logits(plain, data, tmp_path / "k.topk", top_k=3, inputs="x")
    by_call = cache_teacher_logits(plain, data, tmp_path / "c.topk", top_k=3, inputs=lambda batch: batch["x"])
    assert torch.equal(by_key[1].indices, by_call[1].indices) and by_key[1].shape == (3,)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("top_k,error", [(0, ValueError), (41, ValueError), ("8", ValueError), (True, ValueError)])
def test_top_k_out_of_range_is_refused_and_leaves_no_file(tmp_path, top_k, error):
    path = tmp_path / "t.topk"
    with pytest.raises(error, match="top_k"):
        cache_teacher_logits(TinyLM(), lm_batches(), path, top_k=top_k)
    assert list(tmp_path.iterdir()) == []


def test_non_finite_teacher_logits_and_changing_vocabularies_are_refused(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            out = torch.randn(2, 5 if x.shape[0] == 1 else 6)
            out[0, 0] = float("nan") if x.shape[0] == 3 else 0.0
            return out

    with pytest.raises(ValueError, match="batch 1.*not finite"):
        cache_teacher_logits(Broken(), [torch.zeros(2), torch.zeros(3)], tmp_path / "a.topk", top_k=2)
    with pytest.raises(ValueError, match="batch 1.*vocabulary"):
        cache_teacher_logits(Broken(), [torch.zeros(2), torch.zeros(1)], tmp_path / "b.topk", top_k=2)
    assert list(tmp_path.iterdir()) == []


def test_truncated_damaged_or_foreign_files_are_refused(tmp_path):
    path = tmp_path / "t.topk"
    cache_teacher_logits(TinyLM(), lm_batches(), path, top_k=4)
    data = path.read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 10):
        (tmp_path / "cut.topk").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            load_teacher_logits(tmp_path / "cut.topk")
    (tmp_path / "other.bin").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a teacher-logit cache"):
        load_teacher_logits(tmp_path / "other.bin")
    (tmp_path / "extra.topk").write_bytes(data[:20] + data)  # the footer no longer matches where the data ends
    with pytest.raises(ValueError, match="damaged"):
        load_teacher_logits(tmp_path / "extra.topk")


def test_a_cache_from_other_data_is_refused(tmp_path):
    teacher, student = TinyLM(seed=1), TinyLM(seed=2)
    batches = lm_batches()
    cache = cache_teacher_logits(teacher, batches, tmp_path / "t.topk", top_k=4)
    distill = DistillationLoss(None, temperature=1.0, alpha=0.5, shift_labels=True)
    # count: more or fewer batches than cached
    with pytest.raises(ValueError, match="more than the 3 batches"):
        list(cache.zip(batches + batches[:1]))
    with pytest.raises(ValueError, match="gave 2 batches"):
        list(cache.zip(batches[:2]))
    with pytest.raises(IndexError, match="holds 3 batches"):
        cache[3]
    # shape: an entry for another batch shape
    longer = {"input_ids": torch.randint(0, 40, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    with pytest.raises(ValueError, match="shape"):
        distill(student(**longer), longer["input_ids"], teacher_outputs=cache[0])
    # same shape, other data (a shuffled loader): the inputs' fingerprint differs
    with pytest.raises(ValueError, match="other inputs"):
        distill(student(**batches[1]), batches[1]["labels"], inputs=batches[1], teacher_outputs=cache[2])
    # the loss counts positions the cache skipped as padding
    batch = batches[2]
    with pytest.raises(ValueError, match="positions the loss counts"):
        DistillationLoss(None, temperature=1.0, alpha=1.0)(student(**batch), teacher_outputs=cache[2])
    # another temperature than the tail mass was computed at
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(None, temperature=2.0, alpha=0.5, shift_labels=True)(
            student(**batch), batch["labels"], inputs=batch, teacher_outputs=cache[2])
    # the right pairing works
    loss = distill(student(**batch), batch["labels"], inputs=batch, teacher_outputs=cache[2])
    assert torch.isfinite(loss)


def test_top_k_logits_check_their_fields():
    values, indices = torch.randn(2, 3, 4), torch.randint(0, 9, (2, 3, 4))
    with pytest.raises(ValueError, match="indices"):
        TopKLogits(values, torch.zeros(2, 3, 4, dtype=torch.long))  # repeated entries
    good = torch.arange(4).expand(2, 3, 4)
    with pytest.raises(ValueError, match="indices"):
        TopKLogits(values, good + 6, vocab_size=9)
    with pytest.raises(ValueError, match="vocab_size"):
        TopKLogits(values, good, vocab_size=3)
    with pytest.raises(ValueError, match="log_tail"):
        TopKLogits(values, good, log_tail=torch.zeros(2))
    with pytest.raises(TypeError, match="indices"):
        TopKLogits(values, good.float())
    with pytest.raises(ValueError, match="temperature"):
        TopKLogits(values, good, temperature=float("inf"))
    entry = TopKLogits(values, good, log_tail=torch.zeros(2, 3), vocab_size=9)
    assert entry[:, :-1].shape == (2, 2) and entry[:, :-1].log_tail.shape == (2, 2)
    with pytest.raises(ValueError, match="shape"):
        token_kd_losses(torch.randn(2, 3, 10), entry, 1.0)  # vocabulary 10, cached 9
