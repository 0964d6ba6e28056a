"""The blog's claims (numbered in docs/design.md#claims), each turned into a paired contrast between two variants
of the grid.

Every check states the direction the blog predicts and is measured at every horizon of the grid, each variant at
its best learning rate (chosen on the validation select half; the spike checks use the grid's largest lr, where
the blog expects the difference), scored on the test half, paired by seed. The p-values of all rows, plus the
contrasts the decision rules need, form one family and are Holm-adjusted together; a row agrees with the blog only
when its adjusted p is below the rules' alpha. A row whose question this grid cannot ask says so instead: a budget
below ``min_tokens``, a precondition (the baseline must have attention sinks before DIFF V2 can remove them), or a
diagnostic the runs did not log. The claim texts are our paraphrases; the numbers are those of docs/design.md#claims.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..eval.registry import Score
from ..metrics import HIDDEN_OUTLIER_RATIO, KEY0_A1, KEY0_A2, LOGIT_TOP1, SINK_SHARE, SINK_THRESHOLD
from .analysis import Contrast, Metric, best_lr, contrast, mean, test_loss
from .results import Grid, RunResult
from .rules import NOT_MEANINGFUL, NOT_TESTABLE, RuleSet
from .stats import fmt_p, holm

Precondition = Callable[[Grid, int], str | None]  # (grid, steps) -> why the row cannot be tested, or None


def _spikes(flag: str) -> Metric:
    return lambda r: None if (n := r.spikes_after_warmup(flag)) is None else float(n)


def grad_growth_ratio(r: RunResult) -> float | None:
    growth = r.grad_growth()
    return growth.ratio if growth else None


def _diag(key: str, reduce: Callable[[list], float], first: bool = False) -> Metric:
    def metric(r: RunResult) -> float | None:
        # a diverged run's last diagnostics are from another step than everyone else's: leave them out
        rec = r.first_diag if first else r.diag if r.status == "finished" else None
        return reduce(rec[key]) if rec and key in rec else None

    return metric


def _max_nested(xs: list) -> float:
    return max(max(x) for x in xs)


def key0_per_map(r: RunResult) -> float | None:
    """Mean key-0 mass over every softmax map (a¹ and, for DIFF, a²) of every layer, from the last diagnostics."""
    rec = r.diag if r.status == "finished" else None
    if not rec or KEY0_A1 not in rec:
        return None
    values = [v for layer in rec[KEY0_A1] for v in layer] + [v for layer in rec.get(KEY0_A2, []) for v in layer]
    return sum(values) / len(values)


def baseline_has_sinks(variant: str) -> Precondition:
    def check(grid: Grid, steps: int) -> str | None:
        lr = best_lr(grid, variant, steps)
        shares = [_diag(SINK_SHARE, lambda xs: sum(xs) / len(xs))(r) for r in grid.select(variant, lr, steps)]
        shares = [s for s in shares if s is not None]
        if shares and max(shares) == 0:
            return (
                f"{variant} has no sink head (no head puts > {SINK_THRESHOLD} of its attention on key 0), so "
                "there is no sink for DIFF V2 to remove"
            )
        return None

    return check


@dataclass
class Check:
    ref: str  # the claim number(s) of docs/design.md#claims, or the decision rule a row serves
    claim: str  # our paraphrase of what the blog says
    a: str  # variant expected to be ...
    b: str  # ... lower than this one on the metric (or higher, see ``expect``)
    metric: Metric
    unit: str
    expect: str = "lower"  # "lower": the blog predicts metric(a) < metric(b); "higher": the opposite
    at_largest_lr: bool = False
    precondition: Precondition | None = None


CHECKS = [
    Check(
        "2", "DIFF V2 reaches a lower LM loss than a Transformer", "diff_v2", "baseline_matched", test_loss, "test loss"
    ),
    Check(
        "2, control",
        "DIFF V2 beats a Transformer with a per-head sigmoid gate (Gated Attention)",
        "diff_v2",
        "baseline_gated",
        test_loss,
        "test loss",
    ),
    Check(
        "2, control",
        "DIFF V2 beats a Transformer with its 2h query heads (the blog's comparison)",
        "diff_v2",
        "baseline_2h_matched",
        test_loss,
        "test loss",
    ),
    Check(
        "26",
        "DIFF V2 beats a parameter-matched 1.5h-head Transformer (ablation 4)",
        "diff_v2",
        "baseline_1p5h",
        test_loss,
        "test loss",
    ),
    Check(
        "3",
        "DIFF V2 has fewer loss spikes than a Transformer, most of all at large lr",
        "diff_v2",
        "baseline_matched",
        _spikes("loss_spike"),
        "loss spikes after warmup",
        at_largest_lr=True,
    ),
    Check(
        "3",
        "DIFF V2 has fewer gradient spikes than a Transformer",
        "diff_v2",
        "baseline_matched",
        _spikes("grad_spike"),
        "grad-norm spikes after warmup",
        at_largest_lr=True,
    ),
    Check(
        "14",
        "DIFF V1's gradient norm grows late in training, DIFF V2's less",
        "diff_v2",
        "diff_v1",
        grad_growth_ratio,
        "grad norm, median of the last 20% / first 20% of post-warmup steps",
    ),
    Check(
        "4",
        "DIFF V2 has smaller activation outliers than a Transformer",
        "diff_v2",
        "baseline_matched",
        _diag(HIDDEN_OUTLIER_RATIO, max),
        "max over layers of max|h| / RMS(h)",
    ),
    Check(
        "4",
        "DIFF V2 has smaller attention-logit outliers than a Transformer",
        "diff_v2",
        "baseline_matched",
        _diag(LOGIT_TOP1, max),
        "largest attention logit over layers",
    ),
    Check(
        "17",
        "DIFF V2 reduces attention sinks",
        "diff_v2",
        "baseline_matched",
        key0_per_map,
        "key-0 mass per softmax map, mean over maps and layers",
        precondition=baseline_has_sinks("baseline_matched"),
    ),
    Check(
        "23",
        "Pairing heads across GQA groups (ablation 1) raises the loss",
        "diff_v2",
        "v2_split",
        test_loss,
        "test loss",
    ),
    Check(
        "23",
        "Pairing heads across GQA groups (ablation 1) adds gradient spikes",
        "diff_v2",
        "v2_split",
        _spikes("grad_spike"),
        "grad-norm spikes after warmup",
    ),
    Check("24", "Dropping λ (ablation 2) raises the loss", "diff_v2", "v2_no_lambda", test_loss, "test loss"),
    Check(
        "24",
        "Dropping λ (ablation 2) makes the context RMS very small at init",
        "diff_v2",
        "v2_no_lambda",
        _diag("context_rms", lambda xs: sum(xs) / len(xs), first=True),
        "mean context RMS at step 1",
        expect="higher",
    ),
    Check("25", "Dropping the sigmoid (ablation 3) raises the loss", "diff_v2", "v2_linear", test_loss, "test loss"),
    Check(
        "25",
        "Dropping the sigmoid (ablation 3) leaves the context RMS unbounded above",
        "diff_v2",
        "v2_linear",
        _diag("context_rms_per_head", _max_nested),
        "max per-head context RMS",
    ),
]


# The DIFF V1 paper's attention-noise claims (docs/eval.md names the section each task follows), measured by the
# evaluation tasks' headline scores (``[compare] eval_tasks``); the direction of each is the score's own.
EVAL_CLAIMS = {
    "needle_rank_top1": ("V1 §3.4", "DIFF V2 retrieves needles from its context better than a Transformer"),
    "needle_exact": ("V1 §3.4", "DIFF V2 answers needle queries exactly more often than a Transformer"),
    "passkey_rank_top1": ("V1 §3.4", "DIFF V2 finds a pass key in filler better than a Transformer"),
    "answer_attention": ("V1 Table 3", "DIFF V2 puts more attention on the answer than a Transformer"),
    "ar_hit_loss": ("V1 §3.8", "DIFF V2 predicts recurring bigrams better than a Transformer"),
    "distractor_unrelated": ("V1 noise", "unrelated context costs DIFF V2 less than a Transformer"),
    "icl_accuracy": ("V1 §3.6", "DIFF V2 learns a label mapping in context better than a Transformer"),
    "icl_margin": ("V1 §3.6", "DIFF V2 depends less on the order of the demonstrations than a Transformer"),
    "lowbit4_loss_increase": ("V1 §3.7", "DIFF V2 loses less than a Transformer with 4-bit attention logits"),
    "lowbit4_needle_rank": ("V1 §3.7", "DIFF V2 retrieves better than a Transformer with 4-bit attention logits"),
    "kv_int8_loss_increase": ("V1 §3.7, cache", "an int8 KV cache costs DIFF V2 less loss than a Transformer"),
}


def score_metric(name: str) -> Metric:
    return lambda r: None if (s := r.scores.get(name)) is None else s.value


def seen_scores(grid: Grid) -> dict[str, Score]:
    """Every headline score some finished run of the grid has, by name (one run's instance of each)."""
    return {name: score for r in grid.runs for name, score in r.scores.items()}


def eval_checks(grid: Grid, a: str = "diff_v2", b: str = "baseline_matched") -> list[Check]:
    """The attention-noise rows whose scores some finished run of the grid has."""
    seen = seen_scores(grid)
    return [
        Check(
            ref,
            claim,
            a,
            b,
            score_metric(name),
            seen[name].what,
            expect="higher" if seen[name].higher_is_better else "lower",
        )
        for name, (ref, claim) in EVAL_CLAIMS.items()
        if name in seen
    ]


@dataclass
class Finding:
    check: Check
    steps: int
    contrast: Contrast
    blocked: str = ""  # why no test was made (budget, precondition, no data)
    p_adjusted: float | None = None
    verdict: str = ""

    @property
    def in_family(self) -> bool:
        return not self.blocked and self.contrast.result.p is not None

    def measured(self) -> str:
        c, r = self.contrast, self.contrast.result
        if r.n == 0:
            return "no data (runs missing, diverged or the diagnostic not logged)"
        ma, mb = mean(list(c.a_values.values())), mean(list(c.b_values.values()))
        text = f"{c.a} {ma:.4g} vs {c.b} {mb:.4g} ({self.check.unit}); paired Δ = {r.mean:+.4g}"
        if r.ci is not None:
            text += f", 95% t-interval {r.fmt_ci(4)}"
        lower = sum(d < 0 for d in r.diffs)
        text += f", range {r.fmt_range(4)}, {lower}/{r.n} seeds lower, p = {fmt_p(r.p, r.note)}"
        return text + f", sign-test p = {fmt_p(r.sign_p)}"


def rule_checks(rule_set: RuleSet) -> list[Check]:
    """Rows the ``beats`` rules need that are not blog claims already (they join the Holm family)."""
    have = {(c.a, c.b) for c in CHECKS if c.metric is test_loss}
    extra = []
    for rule in rule_set.rules:
        if rule.kind == "beats":
            for other in rule.against:
                if (rule.variant, other) not in have:
                    have.add((rule.variant, other))
                    extra.append(
                        Check(
                            f"rule {rule.name}",
                            f"{rule.variant} beats {other}",
                            rule.variant,
                            other,
                            test_loss,
                            "test loss",
                        )
                    )
    return extra


def evaluate(grid: Grid, rule_set: RuleSet) -> list[Finding]:
    """Every check whose two variants are in the grid, at every horizon, Holm-adjusted as one family."""
    findings = []
    for check in [*CHECKS, *rule_checks(rule_set), *eval_checks(grid)]:
        if check.a not in grid.variants or check.b not in grid.variants:
            continue
        for steps in grid.horizons:
            lr = max(grid.lrs) if check.at_largest_lr else None
            found = Finding(check, steps, contrast(grid, check.a, check.b, steps, check.metric, lr=lr))
            if grid.tokens(steps) < rule_set.min_tokens:
                found.blocked = NOT_MEANINGFUL
            elif check.precondition is not None and (why := check.precondition(grid, steps)):
                found.blocked = f"{NOT_TESTABLE}: {why}"
            findings.append(found)
    for f, p in zip(findings, holm([f.contrast.result.p if f.in_family else None for f in findings]), strict=True):
        f.p_adjusted = p
        f.verdict = _judge(f, rule_set)
    return findings


def _judge(f: Finding, rule_set: RuleSet) -> str:
    r = f.contrast.result
    if f.blocked:
        return f.blocked
    if r.n == 0:
        return "not measured"
    agrees = r.mean < 0 if f.check.expect == "lower" else r.mean > 0
    direction = "as predicted" if agrees else ("no difference" if r.mean == 0 else "opposite to the prediction")
    if r.n < rule_set.min_seeds:
        return f"n too small ({r.n} paired seed(s), needs {rule_set.min_seeds}); direction: {direction}"
    if f.p_adjusted is None:  # no spread across seeds (e.g. no spikes at all): a t-test has nothing to work with
        return f"no spread across seeds, no test; direction: {direction}"
    if f.p_adjusted >= rule_set.alpha:
        return f"not shown (Holm p = {fmt_p(f.p_adjusted)}; direction: {direction})"
    return "consistent with the blog" if agrees else "contradicts the blog at this scale"


def find(findings: list[Finding], a: str, b: str, steps: int) -> Finding | None:
    """The test-loss row of ``a`` against ``b`` at ``steps`` (what a ``beats`` rule reads)."""
    return next(
        (f for f in findings if f.check.a == a and f.check.b == b and f.steps == steps and f.check.metric is test_loss),
        None,
    )
