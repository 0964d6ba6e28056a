"""The evaluation tasks' section of a grid's report: every headline score (``eval.registry.Score``) of every
variant at its best learning rate, mean ± std over seeds, and its paired difference to the baseline. The claims
table tests the DIFF V1 paper's attention-noise claims on the same scores, Holm-adjusted with the blog's claims.
"""

from __future__ import annotations

from .analysis import best_lr, contrast
from .claims import score_metric
from .report_tables import row, tok_heading
from .results import Grid
from .stats import fmt_p, summarize


def eval_section(grid: Grid) -> list[str]:
    seen = {name: score for r in grid.runs for name, score in r.scores.items()}
    if not seen:
        return []
    base = grid.baseline
    lines = [
        "## Evaluation tasks",
        "",
        "Scored on each run's final checkpoint (`diffv2 eval`, seed 0: every run sees the same samples), each "
        f"variant at its best lr; mean ± std over seeds (n), then the paired Δ against `{base}` with its 95% "
        "t-interval and unadjusted p (the claims table adjusts). ↑: higher is better; ↓: lower is better.",
        "",
        "| score | what |",
        "|---|---|",
        *(row([f"`{name}` {'↑' if s.higher_is_better else '↓'}", s.what]) for name, s in seen.items()),
        "",
    ]
    for steps in grid.horizons:
        lines += [f"### {tok_heading(grid, steps)}", ""]
        lines += [row(["variant", *seen]), "|---|" + "---:|" * len(seen)]
        for v in grid.variants:
            lr = best_lr(grid, v, steps)
            cells = [f"{v}" + (f" (lr {lr:g})" if lr is not None else "")]
            for name in seen:
                metric = score_metric(name)
                s = summarize([x for r in grid.select(v, lr, steps) if (x := metric(r)) is not None])
                text = "–" if s.mean is None else f"{s.fmt(3)} ({s.n})"
                if v != base and s.mean is not None:
                    c = contrast(grid, v, base, steps, metric).result
                    if c.mean is not None:
                        text += f"<br>Δ {c.mean:+.3f} {c.fmt_ci(3)}, p {fmt_p(c.p, c.note)}"
                cells.append(text)
            lines.append(row(cells))
        lines.append("")
    return lines
