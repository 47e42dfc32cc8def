"""Metrics: teacher-student agreement and sparsity, single process and across two DDP ranks."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_callbacks.metrics import Sparsity, TeacherStudentAgreement


def test_agreement_and_kl_against_a_reference_over_several_updates():
    torch.manual_seed(0)
    metric = TeacherStudentAgreement(temperature=2.0)
    batches = [(torch.randn(5, 7), torch.randn(5, 7)) for _ in range(3)]
    for student, teacher in batches:
        metric.update(student, teacher)
    student, teacher = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    result = metric.compute()
    expected_agree = (student.argmax(-1) == teacher.argmax(-1)).double().mean()
    expected_kl = F.kl_div(F.log_softmax(student / 2, -1), F.softmax(teacher / 2, -1), reduction="batchmean")
    assert float(result["agreement"]) == pytest.approx(float(expected_agree))
    assert float(result["kl"]) == pytest.approx(float(expected_kl), rel=1e-5)


def test_agreement_mask_drops_positions_and_errors():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    metric = TeacherStudentAgreement()
    metric.update(student, teacher, mask=mask)
    keep = mask.bool()
    expected = (student[keep].argmax(-1) == teacher[keep].argmax(-1)).double().mean()
    assert float(metric.compute()["agreement"]) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="teacher_logits"):
        metric.update(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="temperature"):
        TeacherStudentAgreement(temperature=0)


def test_sparsity_counts_exact_zeros_of_selected_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Conv1d(2, 2, 3), nn.LayerNorm(4))
    with torch.no_grad():
        model[0].weight[:2] = 0.0  # 8 of 16
        model[2].weight.zero_()  # 12 of 12
        model[0].bias.zero_()  # biases are not counted
        model[3].weight.zero_()  # nor norms
    metric = Sparsity()
    metric.update(model)
    assert float(metric.compute()) == pytest.approx(20 / 28)
    only_linear = Sparsity(modules=["0"])
    only_linear.update(model)
    assert float(only_linear.compute()) == pytest.approx(0.5)
    excluded = Sparsity(exclude=[nn.Conv1d])
    excluded.update(model)
    assert float(excluded.compute()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="modules"):
        Sparsity(modules=["missing"]).update(model)
    with pytest.raises(TypeError, match="model"):
        Sparsity().update(torch.zeros(3))


def _ddp_metrics_worker(path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 5), torch.randn(2, 6, 5)  # same on both ranks; each takes its half
    metric = TeacherStudentAgreement()
    metric.update(student[rank], teacher[rank])
    result = {k: float(v) for k, v in metric.compute().items()}
    model = nn.Linear(10, 1)
    with torch.no_grad():
        model.weight[0, : 2 + 6 * rank] = 0.0  # rank 0: 2 zeros, rank 1: 8 zeros
    sparsity = Sparsity()
    sparsity.update(model)
    result["sparsity"] = float(sparsity.compute())
    with open(os.path.join(path, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


def test_metrics_reduce_over_two_ddp_ranks(tmp_path, launch_two_processes):
    launch_two_processes(_ddp_metrics_worker, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    flat_s, flat_t = student.reshape(-1, 5), teacher.reshape(-1, 5)
    agreement = float((flat_s.argmax(-1) == flat_t.argmax(-1)).double().mean())
    kl = float(F.kl_div(F.log_softmax(flat_s, -1), F.softmax(flat_t, -1), reduction="batchmean"))
    for result in results:  # every rank computes the global value, not its own half
        assert result["agreement"] == pytest.approx(agreement)
        assert result["kl"] == pytest.approx(kl, rel=1e-5)
        assert result["sparsity"] == pytest.approx(10 / 20)
