"""The digits example (examples/compress_digits.py) and the benchmark runner, at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# tiny but complete: pruning reaches its target at step 26 of 44, QAT runs from step 30
TINY = [
    "--teacher-epochs", "3", "--epochs", "2", "--teacher-hidden", "64", "--student-hidden", "32",
    "--lr", "1e-2", "--latency-repeats", "3", "--no-progress", "--sparsity", "0.75",
]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


example = _load(REPO / "examples" / "compress_digits.py", "compress_digits_example")
run_all = _load(REPO / "benchmarks" / "run_all.py", "benchmarks_run_all")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    return out, example.main(TINY + ["--output-dir", str(out)])


def test_writes_every_output(tiny_run):
    out, metrics = tiny_run
    for name in ("student.ccz", "student.onnx", "student.pte", "recipe.yaml", "metrics.json", "training.png",
                 "teacher.pt", "dense_student.pt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["table"] == metrics["table"]
    assert len(on_disk["history"]["compressed_student"]["loss"]) == metrics["student_steps"] == 44


def test_recipe_names_the_techniques(tiny_run):
    import yaml

    out, _ = tiny_run
    text = (out / "recipe.yaml").read_text()
    assert "GradualMagnitudePruning" in text and "QuantizationAwareTraining" in text
    assert yaml.safe_load(text)  # valid, non-empty YAML


def test_accuracy_well_above_chance_and_table_consistent(tiny_run):
    _, metrics = tiny_run
    rows = {row["model"]: row for row in metrics["table"]}
    assert set(rows) == {"teacher", "dense student", "compressed student (int8)", "compressed student (ExecuTorch .pte)"}
    for row in rows.values():
        assert row["accuracy"] > 0.6, row  # chance is 0.1
        assert 0.0 < row["latency_ms"] and row["file_bytes"] > 0
    assert rows["teacher"]["agreement"] == 1.0
    assert rows["compressed student (int8)"]["agreement"] > 0.6
    assert rows["compressed student (ExecuTorch .pte)"]["params"] == rows["compressed student (int8)"]["params"]
    assert metrics["pte"]["test_top1_agreement_vs_fake_quant"] >= 0.98 and metrics["pte"]["bytes"] > 0
    assert rows["teacher"]["params"] > rows["dense student"]["params"] == rows["compressed student (int8)"]["params"]
    assert "| teacher" in metrics["table_text"]


def test_measured_sparsity_is_the_requested_one(tiny_run):
    _, metrics = tiny_run
    assert metrics["requested_sparsity"] == 0.75
    assert metrics["measured_sparsity"] == pytest.approx(0.75, abs=1e-3)
    # snapping to the int8 grid can only add zeros (tiny weights round to code 0), never remove one
    assert 0.75 - 1e-3 <= metrics["int8_weight_zero_fraction"] <= 0.8
    row = next(r for r in metrics["table"] if r["model"].startswith("compressed"))
    weights = 64 * 32  # the one hidden layer (the classifier stays dense)
    assert row["params"] - row["nonzero_params"] >= round(0.75 * weights) - 2  # (a few biases may be zero too)
    history = metrics["history"]["compressed_student"]
    assert history["sparsity"][0] == 0.0 and history["sparsity"][-1] == pytest.approx(0.75, abs=1e-3)


def test_int8_and_reloaded_models_agree_with_the_finalized_one(tiny_run):
    _, metrics = tiny_run
    close = metrics["int8_vs_finalized"]
    assert close["top1_agreement"] >= 0.98
    # against the fake-quant model it came from: export's stated tolerance, 1% of the output range
    assert close["max_abs_logit_diff_vs_fake_quant"] <= 0.01 * close["fake_quant_logit_range"]
    assert metrics["reloaded_vs_finalized_max_abs_diff"] < 1e-4


def test_techniques_can_be_switched_off(tmp_path):
    metrics = example.main(TINY + ["--no-distill", "--no-prune", "--no-qat", "--output-dir", str(tmp_path)])
    assert metrics["requested_sparsity"] == 0.0 and metrics["measured_sparsity"] == 0.0
    assert metrics["history"]["compressed_student"]["sparsity"][-1] == 0.0
    rows = {row["model"]: row for row in metrics["table"]}
    # the same initial weights and updates as the dense student: the same accuracy (float noise aside)
    assert abs(rows["compressed student (int8, PTQ)"]["accuracy"] - rows["dense student"]["accuracy"]) < 0.05
    assert metrics["int8_vs_finalized"]["top1_agreement"] >= 0.98


def test_bad_arguments_fail_before_training(tmp_path):
    with pytest.raises(SystemExit):
        example.main(["--prune-window", "0.6", "0.1", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        example.main(["--qat-start", "1.5", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        example.main(["--weight-bits", "9", "--output-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="target_sparsity"):  # the callback's own check, before any training
        example.main(["--granularity", "2:4", "--sparsity", "0.8", "--output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_nm_granularity_implies_its_sparsity():
    args = example.parse_args(["--granularity", "2:4"])
    assert args.sparsity is None  # GradualMagnitudePruning derives 1 - N/M = 0.5
    callbacks = example.build_callbacks(args, steps=100)
    assert callbacks[0].target_sparsity == 0.5
    assert example.parse_args([]).sparsity == 0.8


def test_two_processes_match_one(tiny_run, tmp_path, run_python):
    """The documented command: ``accelerate launch --multi_gpu --num_processes 2`` on the CPU."""
    _, single = tiny_run
    done = run_python(
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "examples" / "compress_digits.py"), *TINY, "--output-dir", str(tmp_path),
        env={"ACCELERATE_USE_CPU": "1"},
    )
    assert done.stdout.count("| teacher") == 1  # only the main process prints the table
    double = json.loads((tmp_path / "metrics.json").read_text())
    assert double["processes"] == 2 and single["processes"] == 1
    # the same global batches in the same order: plain training matches to float rounding ...
    for run in ("teacher", "dense_student"):
        one, two = single["history"][run]["loss"], double["history"][run]["loss"]
        assert len(one) == len(two) and max(abs(a - b) for a, b in zip(one, two)) < 1e-3 * max(one), run
    # ... while distillation + pruning + QAT may amplify rounding differences: compare the last epoch
    one, two = single["history"]["compressed_student"]["loss"], double["history"]["compressed_student"]["loss"]
    assert len(one) == len(two)
    assert sum(two[-22:]) == pytest.approx(sum(one[-22:]), rel=0.25)
    assert double["measured_sparsity"] == pytest.approx(single["measured_sparsity"])
    for a, b in zip(single["table"], double["table"]):
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.02, (a, b)


# ------------------------------------------------------------------------------- benchmark runner
def test_runner_discovers_and_runs_every_benchmark(tmp_path):
    (tmp_path / "good.py").write_text(
        "def main(argv=None):\n    print('chatter')\n    return 'quick table' if argv == ['--quick'] else 'full table'\n"
    )
    (tmp_path / "broken.py").write_text("def main(argv=None):\n    print('last words')\n    raise RuntimeError('boom')\n")
    (tmp_path / "helpers.py").write_text("X = 1\n")
    (tmp_path / "_private.py").write_text("raise SystemExit('must not be imported')\n")
    lines: list[str] = []
    outcomes = run_all.run_benchmarks(tmp_path, quick=True, out=lines.append)
    text = "\n".join(lines)
    assert dict(outcomes) == {"broken": "RuntimeError: boom", "good": None}
    assert "quick table" in text and "full table" not in text
    assert "chatter" not in text and "last words" in text  # a benchmark's own prints show only when it fails
    assert "torch " + torch.__version__ in text and f"{os.cpu_count()} cores" in text
    lines.clear()
    assert run_all.run_benchmarks(tmp_path, only=["good"], out=lines.append) == [("good", None)]
    assert "full table" in "\n".join(lines)


pruning_overhead = _load(REPO / "benchmarks" / "pruning_overhead.py", "benchmarks_pruning_overhead")


def test_interquartile_mean_drops_the_outer_quarters():
    assert pruning_overhead.interquartile_mean([1.0, 2.0, 3.0, 4.0, 100.0, -50.0, 2.5, 3.5]) == 2.75
    assert pruning_overhead.interquartile_mean([5.0]) == 5.0


def test_pruning_overhead_subset_runs_adjacent_pairs_in_blocks(monkeypatch):
    built = []
    real_build = pruning_overhead.build

    def counting_build(variant, make_model, sparsity):
        built.append(variant)
        return real_build(variant, make_model, sparsity)

    monkeypatch.setattr(pruning_overhead, "build", counting_build)
    result = pruning_overhead.time_variants(lambda: pruning_overhead.mlp(True), (8, 256), ["plain", "gmp"], 0.9,
                                            rounds=4, steps=1, blocks=2)
    assert sorted(built) == ["gmp", "gmp", "plain", "plain"]  # fresh models for each block
    iqm, q1, q3 = result["gmp"]
    assert 0 < q1 <= q3 and 0 < iqm and result["plain ms"] > 0
    with pytest.raises(SystemExit):
        pruning_overhead.main(["--quick", "--variants", "gmp,no such variant"])
