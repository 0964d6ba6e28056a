"""The report's diagnostic tables: attention sinks, activation and logit outliers, stability after warmup."""

from __future__ import annotations

from .. import metrics as m
from .analysis import best_lr, mean
from .report_tables import row, short_tokens, tok_heading
from .results import Grid, RunResult
from .stats import summarize


def _diag_mean(runs: list[RunResult], key: str) -> float | None:
    """A per-layer diagnostic (a number or a per-head list per layer), averaged over layers, heads and runs."""
    values = []
    for r in runs:
        rec = r.diag if r.status == "finished" else None
        if rec and key in rec:
            flat = [x for layer in rec[key] for x in (layer if isinstance(layer, list) else [layer])]
            values.append(sum(flat) / len(flat))
    return mean(values)


def _diag_max(runs: list[RunResult], key: str) -> float | None:
    values = [max(r.diag[key]) for r in runs if r.status == "finished" and r.diag and key in r.diag]
    return mean(values)


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def diagnostics_sections(grid: Grid) -> list[str]:
    lines = [
        "## Attention sinks",
        "",
        "Mass on key 0 per softmax map (a¹ and a² each sum to 1), mean over queries t ≥ 1, heads, layers and "
        "seeds; the DIFF effective map a¹ − σ·a² divided by 1 − σ so that it sums to 1 too (undivided, its "
        f"key-0 mass shrinks by construction); the share of maps whose key-0 mass exceeds {m.SINK_THRESHOLD}; "
        "and what uniform causal attention would put on key 0. A variant with no sink heads has no sink to "
        "remove. From the last diagnostics, each variant at its best lr.",
        "",
    ]
    for steps in grid.horizons:
        lines += [
            f"### {tok_heading(grid, steps)}",
            "",
            "| variant | key 0, a¹ | key 0, a² | key 0, effective / (1 − σ) | sink maps | uniform reference |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for v in grid.variants:
            runs = grid.select(v, best_lr(grid, v, steps), steps)
            lines.append(
                row(
                    [
                        v,
                        _fmt(_diag_mean(runs, m.KEY0_A1)),
                        _fmt(_diag_mean(runs, m.KEY0_A2)),
                        _fmt(_diag_mean(runs, m.KEY0_EFFECTIVE)),
                        _fmt(_diag_mean(runs, m.SINK_SHARE), ".1%"),
                        _fmt(_diag_mean(runs, m.KEY0_UNIFORM)),
                    ]
                )
            )
        lines.append("")
    lines += [
        "## Outliers",
        "",
        "Residual stream after each layer: max|h| / RMS(h) and the kurtosis of its entries (3 for a Gaussian), "
        "both unchanged by the stream's scale; attention logits: the largest and the median over valid (query, "
        "key) pairs. Max over layers (median: mean over layers), mean over seeds, each variant at its best "
        "lr.",
        "",
    ]
    for steps in grid.horizons:
        lines += [
            f"### {tok_heading(grid, steps)}",
            "",
            "| variant | max\\|h\\| / RMS(h) | kurtosis | top-1 logit | median logit |",
            "|---|---:|---:|---:|---:|",
        ]
        for v in grid.variants:
            runs = grid.select(v, best_lr(grid, v, steps), steps)
            lines.append(
                row(
                    [
                        v,
                        _fmt(_diag_max(runs, m.HIDDEN_OUTLIER_RATIO), ".1f"),
                        _fmt(_diag_max(runs, m.HIDDEN_KURTOSIS), ".1f"),
                        _fmt(_diag_max(runs, m.LOGIT_TOP1), ".2f"),
                        _fmt(_diag_mean(runs, m.LOGIT_MEDIAN), ".2f"),
                    ]
                )
            )
        lines.append("")
    return lines


def stability_section(grid: Grid) -> list[str]:
    warmup = int(grid.base["warmup_steps"])
    lines = [
        "## Stability after warmup",
        "",
        f"Counted after the {warmup} warmup steps only. A spike is a step whose loss (grad norm) exceeds "
        f"{grid.base['spike_k']} × the median of the previous {grid.base['spike_window']}; such a detector cannot "
        "see a slow rise of the gradient norm, which the last two columns measure: the median grad norm of the "
        "last 20% of post-warmup steps over that of the first 20%, and the least-squares slope of log10(grad "
        "norm) per 1000 steps. Mean ± std over seeds, at every lr.",
        "",
    ]
    speed = grid.shared_devices == 1
    head = [
        "variant",
        "horizon",
        "lr",
        "loss spikes",
        "grad spikes",
        "grad norm late / early",
        "log10 slope per 1k",
        "non-finite steps",
    ] + (["tokens/s"] if speed else [])
    lines += [row(head), "|---|---:|---:|" + "---:|" * (len(head) - 3)]
    for steps in grid.horizons:
        for lr in grid.lrs:
            for v in grid.variants:
                runs = [r for r in grid.select(v, lr, steps) if r.train.get("step")]
                if not runs:
                    continue
                growth = [g for r in runs if (g := r.grad_growth()) is not None]
                cells = [
                    v,
                    short_tokens(grid.tokens(steps)),
                    f"{lr:g}",
                    summarize([r.spikes_after_warmup("loss_spike") for r in runs]).fmt(1),
                    summarize([r.spikes_after_warmup("grad_spike") for r in runs]).fmt(1),
                    summarize([g.ratio for g in growth]).fmt(3),
                    summarize([g.slope for g in growth]).fmt(3),
                    summarize([r.count("skipped") for r in runs]).fmt(1),
                ]
                if speed:
                    s = summarize([r.median_tokens_per_s for r in runs if r.median_tokens_per_s])
                    cells.append("–" if s.mean is None else f"{s.mean:,.0f}")
                lines.append(row(cells))
    if not speed:
        lines.append("")
        lines.append(
            f"No tokens/s here: up to {grid.shared_devices} runs trained on one device at a time, so their "
            "speeds depend on what shared the device with them; they are no speed comparison."
        )
    return [*lines, ""]
