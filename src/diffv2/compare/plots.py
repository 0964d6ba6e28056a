"""The report's figures: curves over training and per-layer diagnostics, one PNG each, one column per learning rate.

matplotlib's object API (``Figure``, no pyplot) renders straight to PNG without touching the global backend, so
the report can be written from a notebook or a headless job alike. Each variant keeps one colour and line style
in every figure; baselines are dashed.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from .analysis import best_lr, select_loss
from .grid import VARIANTS
from .results import Grid, RunResult, paired_band, seed_band

_PALETTE = (
    "#1f77b4",
    "#17becf",
    "#9467bd",
    "#d62728",
    "#ff7f0e",
    "#2ca02c",
    "#8c564b",
    "#7f7f7f",
    "#e377c2",
    "#bcbd22",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#5254a3",
    "#ad494a",
)
_COLORS = dict(zip(VARIANTS, _PALETTE, strict=False))
DPI = 110


def style(variant: str) -> dict[str, Any]:
    return {"color": _COLORS[variant], "linestyle": "--" if variant.startswith("baseline") else "-"}


def _grid_figure(n_rows: int, n_cols: int, width: float = 5.2, height: float = 3.8) -> tuple[Figure, list[list]]:
    fig = Figure(figsize=(max(6.5, width * n_cols), height * n_rows + 0.6), dpi=DPI, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    return fig, [list(row) for row in axes]


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path)
    return path


def _legend(fig: Figure, axes: list, **kw: Any) -> None:
    """One legend for the whole figure (below it), built from the first axes that has labelled lines."""
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            # as many columns as fit the figure's width at ~7 pt per character
            width_pt = fig.get_figwidth() * 72
            ncols = max(1, min(len(labels), int(width_pt // (7 * max(map(len, labels)) + 40))))
            fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=9, **kw)
            return


def _suptitle(fig: Figure, text: str) -> None:
    """A figure title wrapped to the figure's width (~7 pt per character), so narrow figures do not clip it."""
    width_chars = max(30, int(fig.get_figwidth() * 72 // 7))
    fig.suptitle(textwrap.fill(text, width_chars))


def _lr_title(lr: float) -> str:
    return f"lr = {lr:g}"


def _finished(runs: list[RunResult]) -> list[RunResult]:
    return [r for r in runs if r.train.get("step")]


# ---------------------------------------------------------------------- curves over training
def _band(ax, x: list[float], band: dict[str, list], log_y: bool, **kw: Any) -> None:
    mean, std = band["mean"], band["std"]
    lo = [m - s for m, s in zip(mean, std, strict=True)]
    hi = [m + s for m, s in zip(mean, std, strict=True)]
    if log_y:  # the statistics are of log10(value): draw the geometric mean and its ×/÷ band
        mean, lo, hi = ([10**v for v in vs] for vs in (mean, lo, hi))
    marker = "o" if len(x) < 12 else None
    ax.plot(x, mean, marker=marker, markersize=3, **kw)
    ax.fill_between(x, lo, hi, color=kw["color"], alpha=0.15, linewidth=0)


def _tokens_axis(ax, grid: Grid) -> None:
    ax.set_xlabel("training tokens")
    ax.xaxis.set_major_formatter(EngFormatter(unit="tok"))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.grid(alpha=0.3)


def curve_figure(
    grid: Grid,
    path: Path,
    *,
    source: str,
    name: str,
    ylabel: str,
    title: str,
    log_y: bool = False,
    label: Callable[[str, list[RunResult]], str] | None = None,
    delta: bool = False,
) -> Path:
    """One logged curve against training tokens, one column per lr: mean over seeds ± 1 std.

    ``log_y`` averages log10 values (geometric mean, ×/÷ band). ``delta`` adds a row with each variant's mean
    minus the reference variant's mean, banded by the standard error of that difference.
    """
    fig, axes = _grid_figure(2 if delta else 1, len(grid.lrs), height=3.6)
    for col, lr in enumerate(grid.lrs):
        ax = axes[0][col]
        bands = {v: seed_band(_finished(grid.select(v, lr)), source, name, log=log_y) for v in grid.variants}
        for variant, band in bands.items():
            if band["step"]:
                x = [s * grid.tokens_per_step for s in band["step"]]
                text = label(variant, grid.select(variant, lr)) if label else variant
                _band(ax, x, band, log_y, label=f"{text} (n={max(band['n'])})", **style(variant))
        ax.set_title(_lr_title(lr))
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        _tokens_axis(ax, grid)
        if delta:
            _delta_panel(axes[1][col], grid, bands, ylabel, lr, source, name)
    kind = "geometric mean over seeds, band: ×/÷ 1 geometric std" if log_y else "mean over seeds, band: ± 1 std"
    _suptitle(fig, f"{title} (line: {kind})")
    if label:  # the labels carry per-lr numbers (e.g. spike counts): one legend per panel, not a shared one
        for ax in axes[0]:
            ax.legend(fontsize=7, loc="upper right")
    else:
        _legend(fig, axes[0])
    return _save(fig, path)


def _delta_panel(
    ax, grid: Grid, bands: dict[str, dict[str, list]], ylabel: str, lr: float, source: str, name: str
) -> None:
    reference = _finished(grid.select(grid.baseline, lr))
    if not reference:
        return
    for variant in bands:
        diff = paired_band(_finished(grid.select(variant, lr)), reference, source, name)
        if diff["step"] and variant != grid.baseline:
            _band(ax, [s * grid.tokens_per_step for s in diff["step"]], diff, False, **style(variant))
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_title(f"difference to {grid.baseline}, paired by seed (band: ± 1 standard error)", fontsize=10)
    ax.set_ylabel(f"Δ {ylabel.split(' (')[0]} (below 0 = better)")
    _tokens_axis(ax, grid)


def spike_figure(grid: Grid, path: Path) -> Path:
    """Post-warmup loss and gradient-norm spikes per run: bars = mean over seeds, dots = single seeds, shade = lr."""
    fig, axes = _grid_figure(2, 1, width=max(7.0, 0.35 * len(grid.variants) * (len(grid.lrs) + 1)), height=3.0)
    width = 0.8 / len(grid.lrs)
    shades = [0.35 + 0.65 * (j + 1) / len(grid.lrs) for j in range(len(grid.lrs))]
    for (ax,), flag, what in zip(axes, ("loss_spike", "grad_spike"), ("loss", "gradient-norm"), strict=True):
        top = 1
        for j, lr in enumerate(grid.lrs):
            for i, variant in enumerate(grid.variants):
                counts = [r.spikes_after_warmup(flag) for r in _finished(grid.select(variant, lr))]
                if not counts:
                    continue
                x = i + (j - (len(grid.lrs) - 1) / 2) * width
                ax.bar(
                    x,
                    sum(counts) / len(counts),
                    width * 0.9,
                    color=style(variant)["color"],
                    alpha=shades[j],
                    edgecolor="black",
                    linewidth=0.5,
                )
                ax.plot([x] * len(counts), counts, "k.", markersize=4)
                top = max(top, *counts)
        for j, lr in enumerate(grid.lrs):  # legend entries for the shades only; colours are named on the x axis
            ax.bar(0, 0, color="grey", alpha=shades[j], edgecolor="black", linewidth=0.5, label=_lr_title(lr))
        ax.set_xticks(range(len(grid.variants)), grid.variants, rotation=20, ha="right")
        ax.set_ylim(0, top * 1.15)
        ax.set_ylabel(f"{what} spikes per run")
        ax.set_title(
            f"{what} spikes after warmup (step > k × running median): bar = mean over seeds, dot = one seed",
            fontsize=10,
        )
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


# ---------------------------------------------------------------------- per-layer diagnostics (last diag record)
def _layer_mean(runs: list[RunResult], key: str, reduce: Callable[[list], float] | None = None) -> list[float]:
    """Per-layer values of one diagnostic, averaged over the finished seeds (a diverged run stopped elsewhere)."""
    done = [r for r in runs if r.status == "finished" and r.diag and key in r.diag]
    # a per-head list per layer is reduced to its mean unless told otherwise
    reduce = reduce or (lambda v: sum(v) / len(v) if isinstance(v, list) else v)
    rows = [[reduce(v) for v in r.diag[key]] for r in done]
    return [sum(col) / len(col) for col in zip(*rows, strict=True)] if rows else []


def layer_figure(grid: Grid, path: Path, panels: list[tuple[str, str, bool]], title: str) -> Path:
    """Rows = lrs, columns = ``panels`` of (diag key, y label, log scale): one line per variant over layers."""
    fig, axes = _grid_figure(len(grid.lrs), len(panels), width=5.0, height=3.4)
    for row, lr in zip(axes, grid.lrs, strict=True):
        for ax, (key, ylabel, log_y) in zip(row, panels, strict=True):
            for variant in grid.variants:
                values = _layer_mean(grid.select(variant, lr), key)
                if values:
                    ax.plot(range(len(values)), values, marker="o", markersize=3, label=variant, **style(variant))
            ax.set_title(f"{ylabel.split(' (')[0]}, {_lr_title(lr)}", fontsize=10)
            ax.set_xlabel("layer (0 = first)")
            ax.set_ylabel(ylabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if log_y:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
    _suptitle(fig, f"{title} (last diagnostics of each finished run, mean over seeds)")
    _legend(fig, [ax for row in axes for ax in row])
    return _save(fig, path)


def context_rms_figure(grid: Grid, path: Path) -> Path:
    """Per-layer mean context RMS, and the distribution of per-head RMS over all layers, heads and seeds."""
    fig, axes = _grid_figure(len(grid.lrs), 2, width=5.4, height=3.4)
    for (line_ax, hist_ax), lr in zip(axes, grid.lrs, strict=True):
        pooled_all: dict[str, list[float]] = {}
        for variant in grid.variants:
            runs = grid.select(variant, lr)
            values = _layer_mean(runs, "context_rms")
            if values:
                line_ax.plot(range(len(values)), values, marker="o", markersize=3, label=variant, **style(variant))
            done = [r for r in runs if r.status == "finished" and r.diag]
            pooled_all[variant] = [h for r in done for layer in r.diag.get("context_rms_per_head", []) for h in layer]
        pooled = [v for vs in pooled_all.values() for v in vs if v > 0]
        if pooled:
            lo, hi = math.log10(min(pooled)), math.log10(max(pooled))
            bins = [10 ** (lo + (hi - lo + 1e-9) * i / 30) for i in range(31)]
            for variant, vs in pooled_all.items():
                if vs:
                    hist_ax.hist(vs, bins=bins, histtype="step", linewidth=1.4, label=variant, **style(variant))
            hist_ax.set_xscale("log")
        line_ax.set(
            title=f"mean over heads, {_lr_title(lr)}", xlabel="layer (0 = first)", ylabel="context RMS before W_O"
        )
        line_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        hist_ax.set(
            title=f"per head, all layers and seeds, {_lr_title(lr)}",
            xlabel="context RMS before W_O (log)",
            ylabel="heads (count)",
        )
        for ax in (line_ax, hist_ax):
            ax.grid(alpha=0.3)
    _suptitle(fig, "Context RMS per layer and head (blog: softmax ∈ [1/√n, 1), DIFF V2 ∈ (0, √2) for unit-RMS values)")
    _legend(fig, [axes[0][0]])
    return _save(fig, path)


def lambda_figure(grid: Grid, path: Path, probes: dict[str, list[dict[str, Any]]]) -> Path:
    """σ(λ) per layer (mean ± std over tokens and heads, logged) and, from ``probes``, its per-token histogram."""
    lam_variants = [
        v
        for v in grid.variants
        if grid.models[v]["attention"] in ("diff_v1", "diff_v2") and grid.models[v].get("lambda_mode") != "none"
    ]
    fig, axes = _grid_figure(len(grid.lrs), 2, width=5.4, height=3.4)
    for (layer_ax, hist_ax), lr in zip(axes, grid.lrs, strict=True):
        for k, variant in enumerate(lam_variants):
            runs = grid.select(variant, lr)
            mean, std = _layer_mean(runs, "lambda_mean"), _layer_mean(runs, "lambda_std")
            if mean:
                x = [i + 0.06 * (k - len(lam_variants) / 2) for i in range(len(mean))]  # dodge overlapping bars
                label = "diff_v1 (λ, one per layer)" if variant == "diff_v1" else variant
                layer_ax.errorbar(x, mean, yerr=std, marker="o", markersize=3, capsize=3, label=label, **style(variant))
            for j, probe in enumerate(probes.get(f"{variant}@{lr!r}", [])):
                edges, counts = probe["hist"]["edges"], probe["hist"]["counts"]
                total = sum(counts) or 1
                hist_ax.stairs(
                    [c / total for c in counts],
                    edges,
                    linewidth=1.4,
                    alpha=0.9 if j == 0 else 0.45,
                    label=variant if j == 0 else None,
                    **style(variant),
                )
        layer_ax.set(
            title=f"per layer, mean ± std over tokens and heads, {_lr_title(lr)}",
            xlabel="layer (0 = first)",
            ylabel="subtraction weight σ(λ)",
        )
        layer_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        hist_ax.set(
            title=f"per token and head, all layers, {_lr_title(lr)}",
            xlabel="subtraction weight σ(λ)",
            ylabel="fraction of values",
        )
        if not probes:
            hist_ax.text(
                0.5, 0.5, "not measured (report run with --no-probe)", ha="center", transform=hist_ax.transAxes
            )
        for ax in (layer_ax, hist_ax):
            ax.grid(alpha=0.3)
    _suptitle(fig, "DIFF subtraction weight (v2_linear: λ itself; one histogram line per seed)")
    _legend(fig, [ax for row in axes for ax in row])
    return _save(fig, path)


def params_speed_figure(grid: Grid, params: dict[str, dict[str, float]], path: Path) -> Path:
    """Parameters by component (stacked) and training throughput per variant."""
    fig, axes = _grid_figure(1, 2, width=max(5.5, 0.8 * len(grid.variants)))
    ax_p, ax_s = axes[0]
    parts = (
        ("embedding", "embedding + LM head", "#c7c7c7"),
        ("attention", "attention", "#4c72b0"),
        ("mlp", "SwiGLU", "#dd8452"),
        ("norm", "norms", "#55a868"),
    )
    bottom = [0.0] * len(grid.variants)
    for key, label, color in parts:
        vals = [params[v][key] + (params[v]["lm_head"] if key == "embedding" else 0) for v in grid.variants]
        ax_p.bar(range(len(vals)), vals, bottom=bottom, label=label, color=color, edgecolor="black", linewidth=0.5)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax_p.set(title="parameters by component", ylabel="parameters")
    ax_p.yaxis.set_major_formatter(EngFormatter())
    ax_p.legend(fontsize=8, loc="lower right")
    if grid.shared_devices > 1:  # speeds of runs that shared a device measure the sharing, not the variant
        ax_s.text(
            0.5,
            0.5,
            f"not shown: up to {grid.shared_devices} runs shared a device",
            ha="center",
            transform=ax_s.transAxes,
        )
    for i, variant in enumerate(grid.variants if grid.shared_devices == 1 else []):
        speeds = [r.median_tokens_per_s for r in grid.runs if r.variant == variant and r.median_tokens_per_s]
        if speeds:
            ax_s.bar(i, sum(speeds) / len(speeds), color=style(variant)["color"], edgecolor="black", linewidth=0.5)
            ax_s.plot([i] * len(speeds), speeds, "k.", markersize=4)
    ax_s.set(title="training throughput (median per run; bar: mean, dots: runs)", ylabel="tokens per second")
    ax_s.yaxis.set_major_formatter(EngFormatter())
    for ax in (ax_p, ax_s):
        ax.set_xticks(range(len(grid.variants)), grid.variants, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def lr_figure(grid: Grid, path: Path) -> Path:
    """Select-half loss against lr, one panel per horizon: mean over seeds (line), seeds (dots), chosen lr (star)."""
    fig, axes = _grid_figure(1, len(grid.horizons), width=5.0, height=3.8)
    for ax, steps in zip(axes[0], grid.horizons, strict=True):
        for variant in grid.variants:
            xs, means = [], []
            for lr in grid.lrs:
                values = [v for r in grid.select(variant, lr, steps) if (v := select_loss(r)) is not None]
                if values:
                    xs.append(lr)
                    means.append(sum(values) / len(values))
                    ax.plot([lr] * len(values), values, ".", color=style(variant)["color"], markersize=4, alpha=0.6)
            if xs:
                ax.plot(xs, means, marker="o", markersize=3, label=variant, **style(variant))
                best = best_lr(grid, variant, steps)
                ax.plot([best], [means[xs.index(best)]], "*", color=style(variant)["color"], markersize=11)
        ax.set_xscale("log")
        ax.set(
            title=f"{grid.tokens(steps) / 1e6:,.1f}M tokens",
            xlabel="peak learning rate",
            ylabel="select-half validation loss",
        )
        ax.grid(alpha=0.3)
    _suptitle(fig, "Loss against learning rate (star: the lr each variant is reported at)")
    _legend(fig, axes[0])
    return _save(fig, path)
