"""metrics.jsonl + TensorBoard logging and the run's environment record."""

from __future__ import annotations

import json

import pytest

from diffv2.train.monitor import MetricsLogger, environment


def test_metrics_jsonl_and_truncate_after(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.log("train", step, loss=1.0 / step, per_layer=[step, step + 1])
    log.truncate_after(3)  # a resume from step 3 drops what came after it
    log.log("train", 4, loss=0.5)
    log.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] == 0.5 and records[0]["per_layer"] == [1, 2]


def test_tensorboard_event_files_hold_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 4):
        log.log("train", step, loss=2.0 - 0.5 * step, skipped=False, sink_mass=[0.1 * step, 0.2])
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("train/loss")] == [1.5, 1.0, 0.5]
    assert [e.step for e in acc.Scalars("train/sink_mass/1")] == [1, 2, 3]
    assert "train/skipped" not in acc.Tags()["scalars"]


def test_environment_records_versions():
    env = environment()
    assert env["torch"] and env["python"] and "git_commit" in env
