"""Figures for ``diffv2 inspect``: one head's attention maps, σ(λ) per token, and per-layer context RMS."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.colors import PowerNorm, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .maps import LayerMaps

MAX_LABELS = 48  # beyond this many tokens, tick labels would overlap; positions are shown instead
DPI = 110


def token_labels(pieces: list[str]) -> list[str]:
    """Make whitespace visible so a label is never blank (␣ space, ⏎ newline, → tab)."""
    return [p.replace(" ", "␣").replace("\n", "⏎").replace("\t", "→") or "∅" for p in pieces]


def _ticks(ax, labels: list[str]) -> None:
    n = len(labels)
    if n <= MAX_LABELS:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def attention_figure(maps: LayerMaps, layer: int, head: int, labels: list[str], path: Path, title: str) -> Path:
    """Baseline: the map. DIFF: a¹, a² and the effective a¹ − w·a² (diverging colours, white = 0).

    Keys in a query's future are grey. Probabilities use a square-root scale so the many small weights stay
    visible; the diverging scale ignores query 0 (its only key gets all the weight) and clips beyond.
    """
    panels: list[tuple[str, torch.Tensor, bool]] = []
    if maps.a2 is None:
        panels.append(("attention probabilities", maps.a1[head], False))
    else:
        w = maps.weight[head] if maps.kind == "diff_v2" else maps.weight  # per query token (V2), one scalar (V1)
        name = "σ(λ)" if maps.kind == "diff_v2" else "λ"
        first, second = ("query head 2i", "query head 2i+1") if maps.kind == "diff_v2" else ("q₁·k₁", "q₂·k₂")
        panels += [
            (f"a¹ ({first})", maps.a1[head], False),
            (f"a² ({second})", maps.a2[head], False),
            (f"effective a¹ − {name}·a²", maps.effective[head], True),
        ]
        if maps.kind == "diff_v2":
            title += f"; σ(λ) over tokens: mean {w.mean():.3f}, range [{w.min():.3f}, {w.max():.3f}]"
        else:
            title += f"; λ = {float(w):.3f}"
    size = 4.2 if len(labels) <= 16 else 5.6
    fig = Figure(figsize=(size * len(panels) + 0.8, size + 0.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, data, diverging) in zip(axes, panels, strict=True):
        data = data.float().cpu().numpy()
        t, s = data.shape
        future = np.arange(s)[None, :] > np.arange(s - t, s)[:, None]  # keys a query cannot see: drawn grey
        shown = np.ma.masked_array(data, mask=future)
        if diverging:
            # query 0 sees only itself (weight 1 − σ(λ) there), which would set the scale for everything else
            rest = np.abs(data[1:][~future[1:]]) if t > 1 else np.abs(data)
            bound = max(float(rest.max()) if rest.size else 0.0, 1e-9)
            cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#dddddd")
            image = ax.imshow(shown, cmap=cmap, norm=TwoSlopeNorm(0.0, -bound, bound), interpolation="nearest")
            label, extend = "weight (blue = subtracted)", "both"
        else:
            cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
            image = ax.imshow(shown, cmap=cmap, norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
            label, extend = "attention probability (square-root scale)", "neither"
        fig.colorbar(image, ax=ax, shrink=0.8, label=label, extend=extend)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("key position (token attended to)")
        ax.set_ylabel("query position (token attending)")
        _ticks(ax, labels)
    # wrapped to the figure's width (about 16 characters an inch at this size): a long title is not clipped
    fig.suptitle(textwrap.fill(title, width=int(16 * fig.get_figwidth())), fontsize=10)
    fig.savefig(path)
    return path


def sigma_figure(maps: LayerMaps, layer: int, labels: list[str], path: Path) -> Path:
    """DIFF V2's σ(λ) of every head of one layer along the prompt."""
    weight = maps.weight.float().cpu()  # (heads, T)
    fig = Figure(figsize=(max(6.5, 0.22 * weight.shape[1] + 2), 3.8), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for h in range(weight.shape[0]):
        ax.plot(range(weight.shape[1]), weight[h].numpy(), marker="o", markersize=3, label=f"head {h}")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":", label="0.5 (init, about)")
    ax.set(
        title=f"Subtraction weight σ(λ) per query token, layer {layer}", xlabel="query position (token)", ylabel="σ(λ)"
    )
    if weight.shape[1] <= MAX_LABELS:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.grid(alpha=0.3)
    fig.legend(fontsize=8, ncols=min(5, weight.shape[0] + 1), loc="outside lower center")
    fig.savefig(path)
    return path


def context_rms_figure(all_maps: list[LayerMaps], path: Path, title: str) -> Path:
    """Per-layer context RMS before W_O on the prompt: one dot per head, the bar is the mean over heads."""
    fig = Figure(figsize=(max(6.5, 0.6 * len(all_maps) + 3), 4.0), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    for layer, maps in enumerate(all_maps):
        per_head = maps.stats["context_rms"]
        ax.bar(
            layer,
            sum(per_head) / len(per_head),
            color="#4c72b0",
            alpha=0.5,
            label="mean over heads" if layer == 0 else None,
        )
        ax.plot([layer] * len(per_head), per_head, "k.", markersize=5, label="one head" if layer == 0 else None)
    ax.set(title=title, xlabel="layer (0 = first)", ylabel="context RMS before W_O")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path
