"""The evaluation tasks' section of a grid's report: every headline score (``eval.registry.Score``) of every
variant at its best learning rate, mean ± std over seeds, and its paired difference to the baseline. The claims
table tests the DIFF V1 paper's attention-noise claims on the same scores, Holm-adjusted with the blog's claims.
"""

from __future__ import annotations

from .analysis import best_lr, contrast
from .claims import score_metric, seen_scores
from .report_tables import row, tok_heading
from .results import Grid
from .stats import fmt_p, summarize


def _g(x: float, signed: bool = False) -> str:
    """Three significant digits: the scores range from 1e-5 (a loss increase) to a few nats."""
    return f"{x:+.3g}" if signed else f"{x:.3g}"


def eval_section(grid: Grid) -> list[str]:
    seen = seen_scores(grid)
    problems = [r.eval_problem for r in grid.runs if r.eval_problem]
    if not seen and not problems:
        return []
    base = grid.baseline
    lines = [
        "## Evaluation tasks",
        "",
        "Scored on each run's final checkpoint (`diffv2 eval`, seed 0: every run sees the same samples), each "
        f"variant at its best lr; mean ± std over seeds (n), then the paired Δ against `{base}` with its 95% "
        "t-interval and unadjusted p (the claims table adjusts: its Holm family holds these scores' claims too, "
        "so every row there, decision rules included, is judged more strictly than without them). ↑: higher is "
        "better; ↓: lower is better.",
        "",
        *(f"- not read: {p}" for p in problems),
        *([""] if problems else []),
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
                text = "–" if s.mean is None else _g(s.mean) + ("" if s.std is None else f" ± {_g(s.std)}")
                text += f" ({s.n})" if s.mean is not None else ""
                if v != base and s.mean is not None:
                    c = contrast(grid, v, base, steps, metric).result
                    if c.mean is not None:
                        ci = "" if c.ci is None else f" [{_g(c.ci[0], True)}, {_g(c.ci[1], True)}]"
                        text += f"<br>Δ {_g(c.mean, True)}{ci}, p {fmt_p(c.p, c.note)}"
                cells.append(text)
            lines.append(row(cells))
        lines.append("")
    return lines
