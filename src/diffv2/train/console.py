"""What a run shows on the console besides its progress bar: plain log lines (for files and job schedulers,
``--no-progress``), and the stop requests (Ctrl-C, SIGTERM) that end a run with a checkpoint."""

from __future__ import annotations

import shlex
import signal
import threading
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """While active, SIGINT and SIGTERM only record that a stop was asked for (``signum``): the training loop
    finishes its step, saves a checkpoint and returns. A second signal acts as it would without this (Ctrl-C
    raises KeyboardInterrupt at once). Outside the main thread, where handlers cannot be installed, it does
    nothing."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:  # asked twice: stop now, the way that signal would have without us
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = signum

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def stop_message(signum: int, step: int, checkpoint: Path, run_dir: Path, world_size: int) -> str:
    """The one line a stopped run leaves: where its checkpoint is and the command that continues it."""
    command = f"diffv2 train --out_dir {shlex.quote(str(run_dir))} --resume"
    if world_size > 1:
        command = f"the same torchrun launch with {command.removeprefix('diffv2 train ')}"
    return f"{signal.Signals(signum).name} at step {step}: saved {checkpoint}; resume with: {command}"


def log_line(step: int, steps: int, record: dict[str, Any], val_loss: float | None, eta_s: float | None) -> str:
    """``step 20/600  loss 5.1234  val 5.2000  lr 3.00e-03  12,345 tok/s  ETA 1:23``"""
    parts = [f"step {step}/{steps}", f"loss {record['loss']:.4f}"]
    if val_loss is not None:
        parts.append(f"val {val_loss:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if eta_s is not None:
        parts.append(f"ETA {_clock(eta_s)}")
    return "  ".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
