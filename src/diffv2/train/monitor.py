"""What a run reports: spike counting, metrics.jsonl + TensorBoard, and the run directory's metadata."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import torch

from ..data.shards import atomic_write_bytes
from ..errors import DataError


class SpikeDetector:
    """Counts values above ``k`` × the running median of the last ``window`` values (loss or grad norm)."""

    def __init__(self, k: float, window: int) -> None:
        self.k, self.window = k, window
        self.history: deque[float] = deque(maxlen=window)
        self.count = 0

    def update(self, value: float) -> bool:
        # wait for a few values so the median means something; spikes do not enter the baseline
        spike = len(self.history) >= min(10, self.window) and value > self.k * statistics.median(self.history)
        if spike:
            self.count += 1
        else:
            self.history.append(value)
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.window)
        self.count = int(state["count"])


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl``; mirrors scalars to TensorBoard if available."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, *, fresh: bool = False) -> None:
        """``fresh``: a new run, so the records of an earlier attempt in ``run_dir`` (one that stopped before its
        first checkpoint, as nothing else leaves a folder a new run may use) belong to no trajectory: drop them."""
        self.path = run_dir / "metrics.jsonl"
        if self.path.exists() and not self.path.is_file():  # opening a FIFO would block
            raise DataError(f"{self.path}: not a regular file (a FIFO or folder?); move it out of the run folder")
        if fresh:
            for stale in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
                stale.unlink()
        self.file = self.path.open("w" if fresh else "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # optional extra: pip install 'diffv2[tensorboard]'
                self.tb = None

    def log(self, kind: str, step: int, **values: Any) -> None:
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for name, value in _flatten(values):
                self.tb.add_scalar(f"{kind}/{name}", value, step)

    def truncate_after(self, step: int) -> list[dict[str, Any]]:
        """On resume, drop records past the checkpoint so the log holds one trajectory; returns the records
        kept. A line that is not a record (torn by a crash mid-write, or overwritten with binary) is dropped
        too, and said so."""
        self.file.close()
        lines = self.path.read_bytes().splitlines(keepends=True) if self.path.exists() else []
        kept, records, torn = [], [], 0
        for line in lines:
            record = _record(line)
            if record is None:
                torn += line.strip() != b""
            elif record.get("step", 0) <= step:
                kept.append(line if line.endswith(b"\n") else line + b"\n")
                records.append(record)
        if torn:
            print(f"{self.path}: dropped {torn} line(s) that are not JSON records (torn by an interrupted write)")
        atomic_write_bytes(self.path, b"".join(kept))
        self.file = self.path.open("a", encoding="utf-8")
        return records

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def last_results(records: list[dict[str, Any]]) -> tuple[float | None, dict[str, Any]]:
    """The last training loss and the last evaluation's results in a run's records, as a resumed run's summary
    reports them when no step after the checkpoint changes them."""
    loss, evaluation = None, {}
    for record in records:
        if record.get("kind") == "train" and isinstance(record.get("loss"), int | float):
            loss = record["loss"]
        elif record.get("kind") == "eval" and isinstance(record.get("val_loss"), int | float):
            evaluation = {k: v for k, v in record.items() if k not in ("kind", "step", "val_ppl")}
    return loss, evaluation


def _record(line: bytes) -> dict[str, Any] | None:
    """The metrics record on one line of metrics.jsonl, or None when it is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step", 0), int) else None


def _flatten(values: dict[str, Any], prefix: str = ""):
    for name, value in values.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            yield prefix + name, value
        elif isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
            for i, v in enumerate(value):
                yield f"{prefix}{name}/{i}", v
        elif isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{name}/")


def environment() -> dict[str, Any]:
    """What ran: versions, device, git commit of the working tree (if any)."""
    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "argv": sys.argv,
        # > 1 when `diffv2 compare --jobs` ran several runs on one device at once (their speeds then interfere)
        "runs_per_device": int(os.environ.get("DIFFV2_RUNS_PER_DEVICE", "1")),
    }
    try:
        root = Path(__file__).resolve().parents[3]
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=5)
        env["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


class StepProfiler:
    """``torch.profiler`` around training steps ``[start, start + count)``: writes ``rank<r>.txt`` (the kernels
    and ops that took the most device time, or CPU time without a GPU) and ``rank<r>.trace.json`` (Chrome /
    Perfetto trace) into ``out_dir``. A no-op when ``count`` is 0."""

    def __init__(self, out_dir: Path, rank: int, start: int, count: int) -> None:
        self.out_dir, self.rank, self.start, self.stop = out_dir, rank, start, start + count
        self.prof: torch.profiler.profile | None = None
        self.enabled = count > 0

    def before(self, step: int) -> None:
        if self.enabled and self.prof is None and self.start <= step < self.stop:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=False)
            self.prof.start()

    def after(self, step: int) -> None:
        if self.prof is not None and step >= self.stop:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        averages = self.prof.key_averages()
        tables = [averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=80)]
        if torch.cuda.is_available():  # GPU time first; the CPU table shows host waits (syncs, launch-bound)
            tables.insert(0, averages.table(sort_by="cuda_time_total", row_limit=50, max_name_column_width=80))
        (self.out_dir / f"rank{self.rank}.txt").write_text("\n\n".join(tables) + "\n", encoding="utf-8")
        self.prof.export_chrome_trace(str(self.out_dir / f"rank{self.rank}.trace.json"))
        self.prof, self.enabled = None, False
