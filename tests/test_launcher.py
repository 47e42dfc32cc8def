"""The shared two-rank launcher (``launch_two_processes`` in conftest): both ranks run this checkout's
code in one process group, and a failure on any rank fails the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def _report_then_fail_on_rank_one(path):
    import torch.distributed as dist

    import compress_callbacks

    rank = dist.get_rank()
    report = {"world_size": dist.get_world_size(), "package": compress_callbacks.__file__}
    (Path(path) / f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    assert rank == 0, "rank 1 fails on purpose"


def test_both_ranks_run_this_checkout_and_a_failing_rank_fails_the_launch(tmp_path, launch_two_processes):
    with pytest.raises(AssertionError, match="rank 1 fails on purpose"):
        launch_two_processes(_report_then_fail_on_rank_one, tmp_path)
    checkout = Path(__file__).resolve().parents[1] / "compress_callbacks"
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["world_size"] == 2
        assert Path(report["package"]).resolve().parent == checkout


def test_the_launcher_refuses_workers_it_cannot_import(launch_two_processes):
    def nested(path):
        pass

    with pytest.raises(TypeError, match="worker"):
        launch_two_processes(nested, "unused")
    with pytest.raises(TypeError, match="args"):
        launch_two_processes(_report_then_fail_on_rank_one, object())
