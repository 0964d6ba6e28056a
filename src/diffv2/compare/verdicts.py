"""Evaluate a grid's decision rules (:mod:`.rules`) on its results: one verdict per rule, with the numbers."""

from __future__ import annotations

from dataclasses import dataclass

from .analysis import contrast, mean
from .claims import Finding, find
from .results import Grid
from .rules import NOT_MEANINGFUL, NOT_TESTABLE, Rule, RuleSet
from .stats import fmt_p


@dataclass
class Verdict:
    rule: Rule
    verdict: str
    evidence: str


class _Blocked(Exception):
    """A rule cannot be decided; the message is the verdict."""


def _horizons(grid: Grid, which: str) -> list[int]:
    return {"each": grid.horizons, "shortest": grid.horizons[:1], "longest": grid.horizons[-1:]}[which]


def _tokens(grid: Grid, steps: int) -> str:
    n = grid.tokens(steps)
    return f"{n / 1e6:,.1f}M tokens" if n >= 1e6 else f"{n:,} tokens"


def evaluate_rules(grid: Grid, rule_set: RuleSet, findings: list[Finding]) -> list[Verdict]:
    out = []
    for rule in rule_set.rules:
        try:
            verdict, evidence = (_gap_ratio if rule.kind == "gap_ratio" else _beats)(grid, rule_set, rule, findings)
        except _Blocked as blocked:
            verdict, evidence = str(blocked).split("|", 1)
        out.append(Verdict(rule, verdict, evidence))
    return out


def _check_budget(grid: Grid, rule_set: RuleSet, rule: Rule, steps: list[int], reference: list[int]) -> None:
    if any(grid.tokens(s) < rule_set.min_tokens for s in steps + reference):
        raise _Blocked(f"{NOT_MEANINGFUL}|a horizon of this rule is below min_tokens = {rule_set.min_tokens:,}")
    if any(grid.tokens(s) < rule.min_tokens for s in steps):
        raise _Blocked(
            f"{NOT_TESTABLE}|needs a horizon of >= {rule.min_tokens:,} tokens; the grid's longest is "
            f"{grid.tokens(grid.horizons[-1]):,}"
        )


def _gap(grid: Grid, rule_set: RuleSet, pair: tuple[str, str], steps: int, relative: bool) -> tuple[float, str]:
    """loss(b) − loss(a), each at its best lr, mean over paired seeds (divided by loss(b) when ``relative``)."""
    a, b = pair
    c = contrast(grid, b, a, steps)
    r = c.result
    if r.n < rule_set.min_seeds:
        raise _Blocked(
            f"{NOT_TESTABLE}|{r.n} paired seed(s) of {b} and {a} at {_tokens(grid, steps)} finished "
            f"(needs {rule_set.min_seeds})"
        )
    gap = r.mean
    text = f"gap({b} − {a}) = {gap:+.4f} {r.fmt_ci(4)} (lr {c.lr_b:g} / {c.lr_a:g})"
    if relative:
        gap /= mean(list(c.a_values.values()))  # c.a is b: the gap relative to b's loss
        text += f", relative {gap:+.4%}"
    return gap, text


def _gap_ratio(grid: Grid, rule_set: RuleSet, rule: Rule, findings: list[Finding]) -> tuple[str, str]:
    steps = _horizons(grid, rule.horizon)
    if rule.reference_horizon in (None, "each"):
        pairs = [(s, s) for s in steps]
    else:
        pairs = [(s, _horizons(grid, rule.reference_horizon)[0]) for s in steps]
    if any(s == r for s, r in pairs) and rule.pair == rule.reference:
        raise _Blocked(f"{NOT_TESTABLE}|the grid has one horizon; this rule compares two")
    _check_budget(grid, rule_set, rule, [s for s, _ in pairs], [r for _, r in pairs])
    holds, lines = [], []
    for s, r in pairs:
        gap, gap_text = _gap(grid, rule_set, rule.pair, s, rule.relative)
        ref_gap, ref_text = _gap(grid, rule_set, rule.reference, r, rule.relative)
        where = _tokens(grid, s) if s == r else f"{_tokens(grid, s)} vs {_tokens(grid, r)}"
        if ref_gap <= 0:
            raise _Blocked(f"{NOT_TESTABLE}|no gap to explain at {where}: {ref_text}")
        ratio = gap / ref_gap
        holds.append(ratio <= rule.at_most if rule.at_most is not None else ratio >= rule.at_least)
        lines.append(f"{where}: {gap_text}; {ref_text}; ratio {ratio:.3f}")
    return (rule.verdict if all(holds) else rule.otherwise), "; ".join(lines)


def _beats(grid: Grid, rule_set: RuleSet, rule: Rule, findings: list[Finding]) -> tuple[str, str]:
    steps = _horizons(grid, rule.horizon)
    _check_budget(grid, rule_set, rule, steps, [])
    holds, lines = [], []
    for s in steps:
        for other in rule.against:
            f = find(findings, rule.variant, other, s)
            r = f.contrast.result
            if r.n < rule_set.min_seeds:
                raise _Blocked(
                    f"{NOT_TESTABLE}|{r.n} paired seed(s) of {rule.variant} and {other} at "
                    f"{_tokens(grid, s)} finished (needs {rule_set.min_seeds})"
                )
            ok = r.same_sign(negative=True) and f.p_adjusted is not None and f.p_adjusted < rule_set.alpha
            holds.append(ok)
            lower = sum(d < 0 for d in r.diffs)
            lines.append(
                f"{_tokens(grid, s)} vs {other}: Δ = {r.mean:+.4f} {r.fmt_ci(4)}, lower in {lower}/{r.n} "
                f"seeds, Holm p = {fmt_p(f.p_adjusted, r.note)}"
            )
    return (rule.verdict if all(holds) else rule.otherwise), "; ".join(lines)
