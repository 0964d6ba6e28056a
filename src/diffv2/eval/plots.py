"""Figures of evaluation results (matplotlib, imported only here: ``pip install 'diffv2[plots]'``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from ..data import publish_mode

DPI = 110


def save(fig: Figure, path: Path) -> Path:
    """Write the PNG through a temp file in the same folder, so a crash never leaves half an image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
        publish_mode(tmp)  # mkstemp's 0o600 otherwise
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def depth_length_heatmaps(rows: list[dict[str, Any]], train_len: int, title: str, path: Path) -> Path:
    """Exact match and log-likelihood top-1 by depth (x) and context length (y), one panel each."""
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    fig = Figure(figsize=(4.2 * 2, 0.5 * len(lengths) + 2.2))
    cmap = matplotlib.colormaps["viridis"]
    for ax, metric, label in zip(
        fig.subplots(1, 2), ("em", "ll"), ("exact match", "log-likelihood top-1"), strict=True
    ):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for r in rows:
            if r[metric] is not None:
                grid[lengths.index(r["length"]), depths.index(r["depth"])] = r[metric]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto", origin="lower")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_yticks(range(len(lengths)), [f"{n}{'*' if n > train_len else ''}" for n in lengths])
        ax.set_xlabel("depth of the queried item")
        ax.set_ylabel("context length (* past training length)")
        ax.set_title(f"{title}: {label}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return save(fig, path)


def grouped_bars(groups: list[str], series: dict[str, list[float]], ylabel: str, title: str, path: Path) -> Path:
    """Bars per group, one colour per series (e.g. attention on the answer per map)."""
    fig = Figure(figsize=(max(5.0, 0.9 * len(groups) + 2), 3.6))
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.axhline(0, color="k", linewidth=0.5)
    return save(fig, path)
