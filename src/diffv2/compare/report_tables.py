"""The report's tables: decision rules and verdicts, final losses per horizon (paired, with equal-FLOPs and
effective-token readings), loss against lr, per-source loss and the claims (diagnostics: :mod:`.report_diagnostics`)."""

from __future__ import annotations

from typing import Any

from .analysis import best_lr, budget_readings, contrast, halves_available, mean, select_loss, summarize_readings
from .claims import Finding
from .results import Grid
from .rules import RuleSet
from .stats import fmt_p, summarize
from .verdicts import Verdict


def short_tokens(n: float) -> str:
    """16.4M, 768k, 512: a token count for a table cell."""
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n / 1e3:,.1f}k" if n >= 1e3 else f"{n:,.0f}"


def tok_heading(grid: Grid, steps: int) -> str:
    return f"{short_tokens(grid.tokens(steps))} tokens ({steps:,} steps)"


def row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


# ---------------------------------------------------------------------- rules
def rules_section(grid: Grid, rule_set: RuleSet, verdicts: list[Verdict]) -> list[str]:
    lines = ["## Decision rules and verdicts", ""]
    if not rule_set.rules:
        return [
            *lines,
            "This grid's config has no `[compare.rules]`: the tables below describe, they decide nothing "
            "beyond the claims table.",
            "",
        ]
    lines.append(_rules_provenance(grid))
    lines += [
        "",
        f'Settings: a horizon below **{rule_set.min_tokens:,} tokens** per run makes every verdict "not '
        f'meaningful at this budget"; a rule needs **{rule_set.min_seeds} paired seeds**; tests use '
        f"**alpha = {rule_set.alpha:g}** after Holm's correction over the claims table. Every rule compares "
        "each variant at its best learning rate (chosen on the validation select half) on the test half, "
        "paired by seed.",
        "",
    ]
    for i, rule in enumerate(rule_set.rules, 1):
        lines.append(f"{i}. `{rule.name}`: {rule.describe()}")
    lines += ["", "| rule | verdict | evidence |", "|---|---|---|"]
    for v in verdicts:
        lines.append(row([f"`{v.rule.name}`", f"**{v.verdict}**", v.evidence]))
    return [*lines, ""]


def _rules_provenance(grid: Grid) -> str:
    history = grid.rules_history
    if not history:
        return "When these rules were written is not recorded (the grid predates the record)."
    first, last = history[0], history[-1]
    text = f"First recorded {first['written_at']}, when {first['finished_runs']} of {len(grid.runs)} runs had finished."
    if len(history) > 1:
        text += (
            f" **Changed {len(history) - 1} time(s) since**, last on {last['written_at']} when "
            f"{last['finished_runs']} runs had finished: a rule changed after results existed is not a rule "
            "written first."
        )
    elif first["finished_runs"]:
        text += " Some runs had finished before the rules were recorded."
    return text


# ---------------------------------------------------------------------- final losses
_FINAL_HEAD = (
    "variant|best lr|finished / diverged / runs|test loss|Δ vs {base}|95% t-interval|range|p|sign p|"
    "FLOPs/token vs {base}|Δ at equal FLOPs|effective tokens"
)


def final_loss_sections(grid: Grid, params: dict[str, dict[str, float]]) -> list[str]:
    lines = []
    fpt = {v: params[v]["flops_per_token"] for v in grid.variants}
    base = grid.baseline
    selection = (
        "on the validation **select** half; every loss below is on the **test** half"
        if halves_available(grid)
        else "**on the same validation tokens it is scored on** (these runs were "
        "logged before the select/test halves existed, so the best-lr numbers are optimistic)"
    )
    for steps in grid.horizons:
        lines += [
            f"## Final loss at {tok_heading(grid, steps)}",
            "",
            f"Each variant at its best learning rate of {', '.join(f'{lr:g}' for lr in grid.lrs)}, chosen "
            f"{selection}. Δ is paired by seed against `{base}` (at its own best lr): mean, 95% t-interval "
            "(n − 1 df), range of the per-seed differences, paired t-test p and exact sign-test p, "
            "unadjusted here (the claims table adjusts). *Equal FLOPs*: Δ read off both runs' curves at the "
            "FLOP budget both reached. *Effective tokens*: the baseline's tokens to reach the variant's final "
            'test loss over the variant\'s tokens ("> x" when the baseline never got there). Both readings '
            "use intermediate points of a cosine schedule, which has not annealed there.",
            "",
            row(_FINAL_HEAD.format(base=base).split("|")),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for v in grid.variants:
            lr = best_lr(grid, v, steps)
            runs = [r for r in grid.runs if r.variant == v and r.steps == steps]
            counts = (
                f"{sum(r.status == 'finished' for r in runs)} / {sum(r.status == 'diverged' for r in runs)} / "
                f"{len(runs)}"
            )
            if lr is None:
                lines.append(row([v, "–", counts, "no finished run", *[""] * 8]))
                continue
            losses = summarize([x for r in grid.select(v, lr, steps) if (x := r.final_loss("test")) is not None])
            cells = [v, f"{lr:g}", counts, losses.fmt(4)]
            if v == base:
                cells += ["(reference)", "", "", "", "", "1", "", ""]
            else:
                c = contrast(grid, v, base, steps).result
                delta = "–" if c.mean is None else f"{c.mean:+.4f}"
                cells += [delta, c.fmt_ci(4), c.fmt_range(4), fmt_p(c.p, c.note), fmt_p(c.sign_p)]
                cells.append(f"{fpt[v] / fpt[base]:.3f}")
                cells += _budget_cells(grid, v, base, steps, fpt)
            lines.append(row(cells))
        lines.append("")
    return lines


def _budget_cells(grid: Grid, variant: str, base: str, steps: int, fpt: dict[str, float]) -> list[str]:
    readings = budget_readings(grid, variant, base, steps, fpt)
    s = summarize_readings(readings)
    if not s["n"]:
        return ["–", "–"]
    delta = "–" if s["delta_equal_flops"] is None else f"{s['delta_equal_flops']:+.4f}"
    if s["all_reached"]:
        spread = f" [{s['multiplier_min']:.2f}, {s['multiplier_max']:.2f}]" if s["n"] > 1 else ""
        return [delta, f"{s['multiplier']:.2f}×{spread}"]
    # the baseline never came down to the variant's final loss in some seed: per seed, with lower bounds
    return [delta, ", ".join(f"{r.multiplier:.2f}×" if r.reached else f"> {r.multiplier:.2f}×" for r in readings)]


def lr_section(grid: Grid) -> list[str]:
    """Select-half loss at every lr: the curve each variant's lr was chosen from."""
    if len(grid.lrs) < 2:
        return []
    lines = [
        "## Loss against learning rate",
        "",
        "Select-half loss, mean ± std over finished seeds (n); the chosen lr in bold. Diverged runs count as "
        "missing here and are listed under Runs.",
        "",
    ]
    for steps in grid.horizons:
        lines += [
            f"### {tok_heading(grid, steps)}",
            "",
            row(["variant", *(f"lr {lr:g}" for lr in grid.lrs)]),
            "|---|" + "---:|" * len(grid.lrs),
        ]
        for v in grid.variants:
            best = best_lr(grid, v, steps)
            cells = [v]
            for lr in grid.lrs:
                s = summarize([x for r in grid.select(v, lr, steps) if (x := select_loss(r)) is not None])
                text = "–" if s.mean is None else f"{s.fmt(4)} ({s.n})"
                cells.append(f"**{text}**" if lr == best else text)
            lines.append(row(cells))
        lines.append("")
    return lines


def source_section(grid: Grid) -> list[str]:
    """Test-half loss per source of the validation data, each variant against the baseline, paired by seed."""
    split = grid.val_split or {}
    if not split.get("labeled_sources"):
        return [
            "## Validation loss by source",
            "",
            "Not available: the data was prepared before documents kept "
            "their source (prepare it again to get this table).",
            "",
        ]
    sources = sorted(split.get("test", {}).get("by_source", {}))
    lines = [
        "## Validation loss by source",
        "",
        f"Test-half loss per source at each variant's best lr; Δ vs `{grid.baseline}` paired by seed (mean "
        "[range]). Documents and tokens per source are those of the test half.",
        "",
    ]
    for steps in grid.horizons:
        others = [v for v in grid.variants if v != grid.baseline]
        lines += [
            f"### {tok_heading(grid, steps)}",
            "",
            row(["source", "documents", "tokens", grid.baseline, *(f"Δ {v}" for v in others)]),
            "|---|---:|---:|---:|" + "---:|" * len(others),
        ]
        for src in sources:
            docs, tokens = split["test"]["by_source"][src]
            base = _by_source(grid, grid.baseline, steps, src)
            cells = [src, docs, f"{tokens:,}", "–" if not base else f"{mean(list(base.values())):.4f}"]
            for v in others:
                mine = _by_source(grid, v, steps, src)
                diffs = [mine[s] - base[s] for s in sorted(set(mine) & set(base))]
                cells.append("–" if not diffs else f"{mean(diffs):+.4f} [{min(diffs):+.3f}, {max(diffs):+.3f}]")
            lines.append(row(cells))
        lines.append("")
    return lines


def _by_source(grid: Grid, variant: str, steps: int, source: str) -> dict[int, float]:
    lr = best_lr(grid, variant, steps)
    out = {}
    for r in grid.select(variant, lr, steps) if lr is not None else []:
        group = (r.last_eval.get("val_by_group") or {}).get("test", {}).get(source)
        if r.status == "finished" and group and group[0] is not None:
            out[r.seed] = group[0]
    return out


# ---------------------------------------------------------------------- claims
def claims_section(findings: list[Finding], grid: Grid, rule_set: RuleSet) -> list[str]:
    if not findings:
        return []
    n_tests = sum(f.in_family for f in findings)
    lines = [
        "## The blog's claims, measured",
        "",
        "Each row is a claim of the DIFF V2 blog (our wording; the number is the claim's in docs/design.md#claims), "
        "or a control or rule contrast, turned into a paired contrast between two variants at each horizon. "
        f"The p-values of all {n_tests} tested rows are Holm-adjusted together (alpha {rule_set.alpha:g}). A "
        "verdict holds for this model size, data and token budget only; the blog's runs are production-scale.",
        "",
        "| # | claim | horizon | lr | measured | Holm p | verdict |",
        "|---|---|---:|---:|---|---:|---|",
    ]
    for f in findings:
        c = f.contrast
        lrs = "–" if c.lr_a is None else f"{c.lr_a:g}" if c.lr_a == c.lr_b else f"{c.lr_a:g} / {c.lr_b or 0:g}"
        lines.append(
            row(
                [
                    f.check.ref,
                    f.check.claim,
                    short_tokens(grid.tokens(f.steps)),
                    lrs,
                    f.measured(),
                    fmt_p(f.p_adjusted),
                    f.verdict,
                ]
            )
        )
    return [*lines, ""]
