"""The blog's claims (spec §3), each turned into a measurable contrast between two variants of the grid.

Every check states the direction the blog predicts, measures it per learning rate with Welch's test over seeds,
and says plainly whether our numbers agree, disagree, or cannot tell (few seeds, no variance, no data). The claim
texts are our paraphrases; the numbers in brackets are the spec's claim numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .results import Grid, RunResult
from .stats import summarize, welch

Metric = Callable[[RunResult], float | None]


def final_val_loss(r: RunResult) -> float | None:
    return r.final_val_loss


def _spikes(flag: str) -> Metric:
    return lambda r: float(r.count(flag)) if r.train.get("step") else None


def late_grad_norm(r: RunResult) -> float | None:
    """Mean gradient norm over the last 20% of steps (where the blog sees V1's norm grow)."""
    g = r.train.get("grad_norm", []) if r.status == "finished" else []
    tail = g[int(0.8 * len(g)) :]
    return sum(tail) / len(tail) if tail else None


def _diag(key: str, reduce: Callable[[list], float], first: bool = False) -> Metric:
    def metric(r: RunResult) -> float | None:
        # a diverged run's last diagnostics are from another step than everyone else's: leave them out
        rec = r.first_diag if first else r.diag if r.status == "finished" else None
        return reduce(rec[key]) if rec and key in rec else None

    return metric


def _mean(xs: list) -> float:
    return sum(xs) / len(xs)


def _max_nested(xs: list) -> float:
    return max(max(x) for x in xs)


@dataclass
class Check:
    ref: str  # the spec's claim number(s)
    claim: str  # our paraphrase of what the blog says
    a: str  # variant expected to be ...
    b: str  # ... lower than this one on the metric (or higher, see ``expect``)
    metric: Metric
    unit: str
    expect: str = "lower"  # "lower": the blog predicts metric(a) < metric(b); "higher": the opposite


CHECKS = [
    Check("2", "DIFF V2 reaches a lower LM loss than a Transformer", "diff_v2", "baseline_matched", final_val_loss,
          "final val loss"),
    Check("26", "DIFF V2 beats a parameter-matched 1.5h-head Transformer (ablation 4)", "diff_v2", "baseline_1p5h",
          final_val_loss, "final val loss"),
    Check("3", "DIFF V2 has fewer loss spikes than a Transformer, most of all at large lr", "diff_v2",
          "baseline_matched", _spikes("loss_spike"), "loss spikes per run"),
    Check("3", "DIFF V2 has fewer gradient spikes than a Transformer", "diff_v2", "baseline_matched",
          _spikes("grad_spike"), "grad-norm spikes per run"),
    Check("14", "DIFF V1's late-training gradient norm grows above DIFF V2's", "diff_v2", "diff_v1", late_grad_norm,
          "mean grad norm, last 20% of steps"),
    Check("4", "DIFF V2 has smaller activation outliers than a Transformer", "diff_v2", "baseline_matched",
          _diag("hidden_max", max), "max abs(hidden state) over layers"),
    Check("4", "DIFF V2 has smaller attention-logit outliers than a Transformer", "diff_v2", "baseline_matched",
          _diag("max_logit", max), "max abs(attention logit) over layers"),
    Check("17", "DIFF V2 reduces attention sinks (for DIFF: mass of the effective map a¹ − σ(λ)·a² on token 0)",
          "diff_v2", "baseline_matched",
          _diag("sink_mass", _mean), "mean sink mass over layers"),
    Check("23", "Pairing heads across GQA groups (ablation 1) raises the loss", "diff_v2", "v2_split", final_val_loss,
          "final val loss"),
    Check("23", "Pairing heads across GQA groups (ablation 1) adds gradient spikes", "diff_v2", "v2_split",
          _spikes("grad_spike"), "grad-norm spikes per run"),
    Check("24", "Dropping λ (ablation 2) raises the loss", "diff_v2", "v2_no_lambda", final_val_loss, "final val loss"),
    Check("24", "Dropping λ (ablation 2) makes the context RMS very small at init", "diff_v2", "v2_no_lambda",
          _diag("context_rms", _mean, first=True), "mean context RMS at step 1", expect="higher"),
    Check("25", "Dropping the sigmoid (ablation 3) raises the loss", "diff_v2", "v2_linear", final_val_loss,
          "final val loss"),
    Check("25", "Dropping the sigmoid (ablation 3) leaves the context RMS unbounded above", "diff_v2", "v2_linear",
          _diag("context_rms_per_head", _max_nested), "max per-head context RMS"),
]  # fmt: skip


@dataclass
class Finding:
    check: Check
    lr: float
    measured: str
    verdict: str


def evaluate(grid: Grid) -> list[Finding]:
    """Every check whose two variants are in the grid, at every learning rate."""
    findings = []
    for check in CHECKS:
        if check.a not in grid.variants or check.b not in grid.variants:
            continue
        for lr in grid.lrs:
            a = [check.metric(r) for r in grid.select(check.a, lr)]
            b = [check.metric(r) for r in grid.select(check.b, lr)]
            a, b = [x for x in a if x is not None], [x for x in b if x is not None]
            findings.append(Finding(check, lr, *_judge(check, a, b)))
    return findings


def _judge(check: Check, a: list[float], b: list[float]) -> tuple[str, str]:
    sa, sb = summarize(a), summarize(b)
    if sa.mean is None or sb.mean is None:
        return "no data (runs missing, diverged or not logged)", "not measured"
    cmp = welch(a, b)
    measured = f"{check.a} {sa.fmt(4)} vs {check.b} {sb.fmt(4)} ({check.unit}); Δ = {cmp.diff:+.4g}"
    agrees = cmp.diff < 0 if check.expect == "lower" else cmp.diff > 0
    direction = "as predicted" if agrees else ("no difference" if cmp.diff == 0 else "opposite to the prediction")
    if cmp.note == "n too small":
        return measured, f"inconclusive: n too small (n = {sa.n} and {sb.n}; needs ≥ 2 each); direction: {direction}"
    if cmp.p is None:  # no spread within either variant (e.g. no spikes at all): a t-test has nothing to work with
        return measured, f"no spread across seeds, no test; direction: {direction}"
    measured += f", 95% CI {cmp.fmt_ci(4)}, p = {cmp.fmt_p()}"
    if cmp.p >= 0.05:
        return measured, f"not significant at 5% (direction: {direction})"
    return measured, "consistent with the blog" if agrees else "contradicts the blog at this scale"
