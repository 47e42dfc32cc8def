"""What trackers and the summary see: per-layer sparsity, QAT weight error and input ranges, KD terms,
logged at ``log_every`` and at events only; ``manager.summary()`` / ``manager.report()``."""

from __future__ import annotations

import copy
import io
import json
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from compress_callbacks import (
    CompressionManager,
    DistillationLoss,
    FeatureDistillation,
    GradualMagnitudePruning,
    QuantizationAwareTraining,
)
from compress_callbacks.reporting import distribution_summary, layer_log_values, plain, relative_l2_error

GMP = "compress/GradualMagnitudePruning"
QAT = "compress/QuantizationAwareTraining"


class RecordingAccelerator:
    """What the manager needs of an ``Accelerator`` for logging, recording every ``log`` call."""

    is_main_process = True
    trackers = ["recording"]

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, float]]] = []

    def register_for_checkpointing(self, obj) -> None:
        pass

    def log(self, values, step=None) -> None:
        self.records.append((step, dict(values)))

    def at(self, step: int) -> dict[str, float]:
        (values,) = [values for s, values in self.records if s == step]
        return values


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))


def train(model, optimizer, steps: int, seed: int = 1, distill=None, on_step=None) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 12, generator=g), torch.randint(0, 3, (8,), generator=g)
        logits = model(x)
        loss = distill(logits, y, inputs=x) if distill is not None else F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if on_step is not None:
            on_step()


def attach(model, *callbacks, log_every=0):
    accelerator = RecordingAccelerator()
    manager = CompressionManager(*callbacks, accelerator=accelerator, log_every=log_every)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    manager.attach(model, optimizer)
    return manager, accelerator, optimizer


def int8_fake_quant(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-row int8 fake-quant, written out (the reference for the logged error)."""
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    return (weight / scale).round().clamp(-127, 127) * scale


# ------------------------------------------------------------------------------------ pure math
def test_relative_l2_error_and_distribution_summary_against_numpy():
    a, b = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    assert relative_l2_error(a, b) == pytest.approx(float(np.linalg.norm((a - b).numpy()) / np.linalg.norm(b.numpy())))
    assert relative_l2_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_l2_error(torch.ones(3), torch.zeros(3)) == float("inf")
    with pytest.raises(ValueError, match="approximation"):
        relative_l2_error(torch.zeros(2), torch.zeros(3))
    values = [0.9, 0.1, 0.5, 0.75, 0.3]
    summary = distribution_summary(values)
    expected = dict(zip(("p10", "p50", "p90"), np.percentile(values, [10, 50, 90])))
    assert list(summary) == ["min", "p10", "p50", "p90", "max", "mean"]
    assert summary == pytest.approx({"min": 0.1, "max": 0.9, "mean": float(np.mean(values)), **expected})
    assert distribution_summary([]) == {}
    assert set(layer_log_values("q", {f"l{i}": 0.1 * i for i in range(4)}, max_layers=3)) == {f"q/{k}" for k in summary}
    assert plain({"a": (1, torch.tensor(2.0)), "b": "-", "c": None}) == {"a": [1, 2.0], "b": None, "c": None}


# ------------------------------------------------------------------------------------ pruning
def test_pruning_logs_per_layer_sparsity_at_log_steps_and_mask_updates_one_record_per_step():
    model = mlp()
    gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=4, update_every=2)
    manager, accelerator, optimizer = attach(model, gmp, log_every=3)
    train(model, optimizer, 6)
    steps = [step for step, _ in accelerator.records]
    assert steps == [0, 2, 3, 4, 6]  # attach, mask update, log_every, mask update (end), log_every
    assert accelerator.at(2)[f"{GMP}/target_sparsity"] == pytest.approx(gmp.sparsity_at(2))
    last = accelerator.at(6)
    measured = {name: float((layer.weight == 0).float().mean()) for name, layer in (("0", model[0]), ("2", model[2]), ("4", model[4]))}
    assert {name: last[f"{GMP}/layer/{name}/sparsity"] for name in measured} == pytest.approx(measured)
    assert measured == pytest.approx({name: 0.5 for name in measured}, abs=0.02)
    values = list(measured.values())
    assert last[f"{GMP}/sparsity/min"] == pytest.approx(min(values)) and last[f"{GMP}/sparsity/max"] == pytest.approx(max(values))
    assert last[f"{GMP}/sparsity/p50"] == pytest.approx(float(np.median(values)))
    zeros = sum(int((layer.weight == 0).sum()) for layer in (model[0], model[2], model[4]))
    total = sum(layer.weight.numel() for layer in (model[0], model[2], model[4]))
    assert last[f"{GMP}/sparsity/overall"] == pytest.approx(zeros / total)


def test_per_layer_keys_stop_at_max_layer_keys():
    model = mlp()
    gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=2, update_every=1)
    gmp.max_layer_keys = 2  # three layers: the summary over layers only
    manager, accelerator, optimizer = attach(model, gmp, log_every=2)
    train(model, optimizer, 2)
    keys = set(accelerator.at(2))
    assert not any("/layer/" in key for key in keys)
    assert {f"{GMP}/sparsity/{s}" for s in ("min", "p10", "p50", "p90", "max", "mean")} <= keys


def test_values_are_measured_only_when_logged(monkeypatch):
    model = mlp()
    qat = QuantizationAwareTraining(start_step=5)
    gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=8, update_every=4, modules=["0"])
    calls = {"qat": 0, "gmp": 0}
    for name, technique in (("qat", qat), ("gmp", gmp)):
        original = technique.log_values

        def counted(original=original, name=name):
            calls[name] += 1
            return original()

        monkeypatch.setattr(technique, "log_values", counted)
    manager, accelerator, optimizer = attach(model, qat, gmp, log_every=10)
    train(model, optimizer, 20)
    # attach; QAT starts at 5; masks at 4 and 8 (GMP logs itself); log_every at 10 and 20 (both)
    assert calls == {"qat": 1 + 1 + 2, "gmp": 1 + 2 + 2}
    assert [step for step, _ in accelerator.records] == [0, 4, 5, 8, 10, 20]


# ------------------------------------------------------------------------------------ QAT
def test_qat_logs_weight_error_and_input_ranges_at_its_events_and_finalize():
    model = mlp()
    qat = QuantizationAwareTraining(start_step=2, freeze_observers_step=4)
    manager, accelerator, optimizer = attach(model, qat)
    train(model, optimizer, 5)
    assert [step for step, _ in accelerator.records] == [0, 2, 4]
    assert f"{QAT}/weight_error/max" not in accelerator.at(0)  # before start_step: the float model runs
    started, frozen = accelerator.at(2), accelerator.at(4)
    assert started[f"{QAT}/active"] == 1.0 and started[f"{QAT}/observers_frozen"] == 0.0
    assert frozen[f"{QAT}/observers_frozen"] == 1.0
    assert all(f"{QAT}/layer/{name}/weight_error" in started for name in ("0", "2", "4"))

    ranges = {name: (float(lo), float(hi)) for name, (lo, hi) in qat.ranges.items()}
    expected = {name: relative_l2_error(int8_fake_quant(layer.weight.detach()), layer.weight.detach())
                for name, layer in (("0", model[0]), ("2", model[2]), ("4", model[4]))}
    manager.finalize(model)
    step, final = accelerator.records[-1]
    assert step == 5
    assert {name: final[f"{QAT}/layer/{name}/weight_error"] for name in expected} == pytest.approx(expected, rel=1e-4)
    assert 0.0 < min(expected.values()) and max(expected.values()) < 0.01
    assert final[f"{QAT}/weight_error/mean"] == pytest.approx(np.mean(list(expected.values())), rel=1e-4)
    for name, (lo, hi) in ranges.items():
        assert (final[f"{QAT}/layer/{name}/input_min"], final[f"{QAT}/layer/{name}/input_max"]) == pytest.approx((lo, hi))
    assert final[f"{QAT}/input_min/min"] == pytest.approx(min(lo for lo, _ in ranges.values()))
    assert final[f"{QAT}/input_max/max"] == pytest.approx(max(hi for _, hi in ranges.values()))


# ------------------------------------------------------------------------------------ distillation
def test_distillation_terms_are_logged_with_the_callbacks():
    model = mlp()
    teacher = mlp(seed=3)
    distill = DistillationLoss(teacher, temperature=2.0, alpha=0.5)
    features = FeatureDistillation(model, teacher, layers={"2": "2"})
    manager, accelerator, optimizer = attach(model, GradualMagnitudePruning(0.5, 0, 4, update_every=4), log_every=2)
    manager.register_loss(distill)
    manager.register_loss(features)
    seen = {}

    def remember():
        if manager.step == 4:
            seen.update(distill.log_values())
            seen.update(features.log_values())

    total = lambda logits, y, inputs: distill(logits, y, inputs=inputs) + features()  # noqa: E731
    train(model, optimizer, 4, distill=total, on_step=remember)
    logged = accelerator.at(4)
    for key in ("hard", "soft", "total"):
        assert logged[f"compress/DistillationLoss/{key}"] == pytest.approx(seen[key])
    assert logged["compress/FeatureDistillation/feature/total"] == pytest.approx(seen["feature/total"])
    assert f"{GMP}/layer/0/sparsity" in logged  # the mask update at 4 and log_every: one record


# ------------------------------------------------------------------------------------ summary / report
def test_report_is_plain_json_and_the_summary_shows_the_same_with_the_error_column():
    model = mlp()
    teacher = mlp(seed=3)
    distill = DistillationLoss(teacher)
    qat = QuantizationAwareTraining(start_step=0, modules=["2", "4"])
    gmp = GradualMagnitudePruning(0.5, start_step=0, end_step=2, update_every=1, modules=["0"])
    manager, accelerator, optimizer = attach(model, gmp, qat)
    manager.register_loss(distill)
    train(model, optimizer, 3, distill=distill)
    report = manager.report()
    assert json.loads(json.dumps(report)) == report
    assert report["step"] == 3 and list(report["techniques"]) == ["0:GradualMagnitudePruning", "1:QuantizationAwareTraining"]
    pruning, quantization = report["techniques"].values()
    assert pruning["config"]["target_sparsity"] == 0.5
    assert pruning["layers"]["0"] == {"shape": [32, 12], "params": 384, "target": 0.5,
                                      "sparsity": float((model[0].weight == 0).float().mean())}
    errors = {name: relative_l2_error(int8_fake_quant(layer.weight.detach()), layer.weight.detach())
              for name, layer in (("2", model[2]), ("4", model[4]))}
    assert {name: row["weight_error"] for name, row in quantization["layers"].items()} == pytest.approx(errors, rel=1e-4)
    assert quantization["layers"]["2"]["folded_bn"] is None and quantization["layers"]["2"]["input_min"] == 0.0
    assert set(report["losses"]["DistillationLoss"]) == {"hard", "soft", "total"}

    table = manager.summary()
    header = next(line for line in table.splitlines() if line.startswith("  module") and "weight_bits" in line)
    assert header.split() == ["module", "type", "shape", "weight_bits", "weight_error", "input_bits", "input_min", "input_max", "folded_bn"]
    row_4 = next(line for line in table.splitlines() if line.startswith("  4 ") and "Linear" in line)
    assert row_4.split()[4] == f"{quantization['layers']['4']['weight_error']:.4f}"
    assert "DistillationLoss: soft=" in table and "hard=" in table
    manager.finalize(model)  # the report keeps the state finalize baked in
    after = manager.report()["techniques"]["1:QuantizationAwareTraining"]["layers"]
    assert {name: row["weight_error"] for name, row in after.items()} == pytest.approx(errors, rel=1e-4)


def test_report_before_attach_and_before_qat_starts():
    manager = CompressionManager(QuantizationAwareTraining(start_step=10))
    assert manager.report()["techniques"]["0:QuantizationAwareTraining"]["layers"] == {}
    assert "(not attached)" in manager.summary()
    model = mlp()
    manager.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    layers = manager.report()["techniques"]["0:QuantizationAwareTraining"]["layers"]
    assert [row["weight_error"] for row in layers.values()] == [None, None, None]
    assert "  -  " in manager.summary()


# ------------------------------------------------------------------------------------ adapters
def test_lightning_forwards_log_steps_and_events_to_its_loggers_at_their_steps(one_thread):
    import lightning.pytorch as L
    from lightning.pytorch.loggers import Logger

    from compress_callbacks.integrations.lightning import CompressionCallback

    class Recording(Logger):
        name, version = "recording", 0

        def __init__(self):
            super().__init__()
            self.records = []

        def log_hyperparams(self, params, *args, **kwargs):
            pass

        def log_metrics(self, metrics, step=None):
            if any(key.startswith("compress/") for key in metrics):
                self.records.append((step, dict(metrics)))

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(80, 12, generator=g), torch.randint(0, 3, (80,), generator=g))
    recording = Recording()
    manager = CompressionManager(GradualMagnitudePruning(0.5, start_step=0, end_step=4, update_every=2), log_every=7)
    trainer = L.Trainer(max_steps=9, callbacks=[CompressionCallback(manager)], accelerator="cpu", logger=recording,
                        log_every_n_steps=50, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = Classifier()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    assert [step for step, _ in recording.records] == [0, 2, 4, 7]  # attach, masks, masks (end), log_every
    last = recording.records[-1][1]
    assert last[f"{GMP}/layer/net.0/sparsity"] == pytest.approx(float((module.net[0].weight == 0).float().mean()))
    assert float(trainer.callback_metrics[f"{GMP}/sparsity/max"]) == pytest.approx(last[f"{GMP}/sparsity/max"])


def test_transformers_trainer_logs_events_at_their_steps(tmp_path, one_thread):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from compress_callbacks.integrations.transformers import CompressionCallback

    torch.manual_seed(0)
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.tensor(i % 2)} for i in range(48)]
    manager = CompressionManager(GradualMagnitudePruning(0.5, start_step=0, end_step=4, update_every=2), QuantizationAwareTraining(start_step=5))
    args = TrainingArguments(str(tmp_path), max_steps=8, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                             save_strategy="no", logging_steps=100, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[CompressionCallback(manager)])
    trainer.train()
    logged = [logs for logs in trainer.state.log_history if "loss" in logs]
    assert [logs["step"] for logs in logged] == [2, 4, 5]  # mask updates, QAT start (logging_steps=100)
    assert logged[0][f"{GMP}/target_sparsity"] == pytest.approx(manager.callbacks[0].sparsity_at(2))
    assert logged[-1][f"{QAT}/active"] == 1.0 and logged[-1][f"{QAT}/weight_error/max"] > 0.0


# ------------------------------------------------------------------------------------ DDP / FSDP2
def _distributed_logging_worker():
    """Two ranks. DDP (different data per rank): every rank logs the same compression values. FSDP2 (the
    same batches on both ranks): the values measured on sharded weights equal a single process's, and
    rank 0 alone reports them without waiting for the other rank."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from torch.distributed.fsdp import fully_shard

    accelerator = Accelerator(cpu=True)
    rank = dist.get_rank()

    def callbacks():
        return (GradualMagnitudePruning(0.5, start_step=0, end_step=4, update_every=2), QuantizationAwareTraining(start_step=1))

    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    manager = CompressionManager(*callbacks(), accelerator=accelerator, log_every=4)
    manager.attach(model, optimizer)
    train(model, optimizer, 4, seed=10 + rank)
    number, step, values = manager.last_logged
    assert step == 4 and f"{QAT}/layer/0/weight_error" in values and f"{QAT}/layer/0/input_max" in values
    everyone = [None, None]
    dist.all_gather_object(everyone, values)
    assert everyone[0] == everyone[1]

    reference = mlp(4)
    sharded = copy.deepcopy(reference)
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    managers = []
    for net in (sharded, reference):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
        managers.append(CompressionManager(*callbacks(), log_every=4))
        managers[-1].attach(net, optimizer)
        train(net, optimizer, 4, seed=3)
    (_, _, got), (_, _, want) = (m.last_logged for m in managers)
    assert set(got) == set(want) and got == pytest.approx(want, rel=1e-4, abs=1e-6)
    if rank == 0:  # reporting from one rank must not wait for the other
        report = managers[0].report()["techniques"]["1:QuantizationAwareTraining"]["layers"]
        assert {name: row["weight_error"] for name, row in report.items()} == {
            name: got[f"{QAT}/layer/{name}/weight_error"] for name in ("0", "2", "4")}
        assert "weight_error" in managers[0].summary()
    dist.barrier()
    for m, net in zip(managers, (sharded, reference)):
        m.finalize(net)


def test_ddp_and_fsdp2_ranks_log_whole_model_values(launch_two_processes):
    launch_two_processes(_distributed_logging_worker, timeout=240)


# ------------------------------------------------------------------------------------ progress bars
class Terminal(io.StringIO):
    """A stderr that says it is a terminal (tqdm shows bars there with ``progress=None``)."""

    def isatty(self) -> bool:
        return True


def test_calibrate_shows_a_progress_bar_on_a_terminal_and_when_asked(monkeypatch, capfd):
    from compress_callbacks.quantization.ptq import calibrate

    batches = [torch.randn(4, 12) for _ in range(3)]
    calibrate(mlp(), batches)  # stderr is no terminal here: no bar
    assert "calibrate" not in capfd.readouterr().err
    calibrate(mlp(), batches, progress=True)
    shown = capfd.readouterr().err
    assert "calibrate: 100%" in shown and "3/3" in shown
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    calibrate(mlp(), batches)
    calibrate(mlp(), batches, progress=False)
    monkeypatch.undo()
    assert terminal.getvalue().count("calibrate: 100%") == 1
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="`progress`"):
        calibrate(model, batches, progress="yes")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing touched


def test_export_calibration_shows_a_progress_bar_on_a_terminal(monkeypatch):
    from compress_callbacks.export import to_int8
    from compress_callbacks.quantization.ptq import calibrate

    torch.manual_seed(0)  # the conv feeds a float pooling: ONNX Runtime needs a calibrated range for its output
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    batches = [torch.randn(2, 3, 8, 8) for _ in range(3)]
    model = calibrate(model, batches, progress=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_int8(model, example_inputs=batches[0][:1], calibration=batches)
    monkeypatch.undo()
    assert "calibrate (ONNX Runtime): 100%" in terminal.getvalue()


def test_export_executorch_shows_its_stages_and_calibration_on_a_terminal(monkeypatch, tmp_path):
    from compress_callbacks.export import export_executorch
    from compress_callbacks.quantization.ptq import calibrate

    batches = [torch.randn(4, 12) for _ in range(2)]
    model = calibrate(mlp().eval(), batches, progress=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_executorch(model, batches[0][:1], tmp_path / "m.pte", calibration=batches)
    monkeypatch.undo()
    shown = terminal.getvalue()
    assert "calibrate (ExecuTorch): 100%" in shown and "2/2" in shown
    assert "export_executorch: 100%" in shown and "3/3" in shown and "parity check" in shown
