"""Evaluation outputs: eval.json (everything), eval.md (a section per task) and the tasks' figures, all written
atomically into one folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..data.shards import atomic_write_bytes
from .registry import Task


def _plain(value: Any) -> Any:
    """NumPy scalars and arrays as plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_outputs(summary: dict[str, Any], tasks: list[Task], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    notes: dict[str, str] = {}
    for task in tasks:
        if task.plot is None:
            continue
        try:
            figures += task.plot(summary["tasks"][task.name], out)
        except ImportError:
            notes[task.name] = "figures need matplotlib: pip install 'diffv2[plots]'"
    json_path, md_path = out / "eval.json", out / "eval.md"
    atomic_write_bytes(json_path, (json.dumps(summary, indent=1, default=_plain) + "\n").encode("utf-8"))
    atomic_write_bytes(md_path, markdown(summary, tasks, figures, notes).encode("utf-8"))
    return [json_path, md_path, *figures]


def markdown(summary: dict[str, Any], tasks: list[Task], figures: list[Path], notes: dict[str, str]) -> str:
    s = summary["settings"]
    head = ", ".join(
        f"{k} {s[k]}" for k in ("checkpoint", "format", "dtype", "device", "seed", "quick", "train_len") if k in s
    )
    lines = ["# Evaluation", "", head + ".", ""]
    for task in tasks:
        result = summary["tasks"][task.name]
        lines += [
            f"## {task.name}",
            "",
            f"{task.summary}. ({result.get('seconds', 0):.0f} s)",
            "",
            task.markdown(result),
            "",
        ]
        lines += [f"![{p.stem}]({p.name})" for p in figures if p.stem.startswith(task.name)]
        if task.name in notes:
            lines.append(f"({notes[task.name]})")
        lines.append("")
    return "\n".join(lines)
