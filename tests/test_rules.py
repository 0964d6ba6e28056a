"""Decision rules as data: parsing, and every verdict reached on synthetic grids whose answer is known."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from diffv2.compare import claims
from diffv2.compare.analysis import best_lr, budget_readings, contrast
from diffv2.compare.curves import first_reach, grad_growth, spikes_after_warmup, value_at
from diffv2.compare.results import Grid, RunResult
from diffv2.compare.rules import NOT_MEANINGFUL, NOT_TESTABLE, parse_rules
from diffv2.compare.verdicts import evaluate_rules
from diffv2.errors import ConfigError

SHORT, LONG = 1000, 6200  # steps; × 16,384 tokens = 16.4M and 101.6M tokens
TOKENS_PER_STEP = 16_384
VARIANTS = ["baseline_matched", "diff_v2", "baseline_zero_out", "diff_v2_zero_out", "baseline_gated"]

RULES = {
    "min_tokens": 10_000_000,
    "init_artefact": {
        "kind": "gap_ratio",
        "pair": ["diff_v2_zero_out", "baseline_zero_out"],
        "reference": ["diff_v2", "baseline_matched"],
        "at_most": 1 / 3,
        "horizon": "shortest",
        "verdict": "init artefact",
    },
    "gating": {
        "kind": "gap_ratio",
        "pair": ["baseline_gated", "baseline_matched"],
        "reference": ["diff_v2", "baseline_matched"],
        "at_least": 2 / 3,
        "verdict": "gating, not subtraction",
    },
    "horizon": {
        "kind": "gap_ratio",
        "pair": ["diff_v2", "baseline_matched"],
        "horizon": "longest",
        "reference_horizon": "shortest",
        "relative": True,
        "at_most": 0.5,
        "min_tokens": 100_000_000,
        "verdict": "horizon-limited",
    },
    "loss_claim": {
        "kind": "beats",
        "variant": "diff_v2",
        "against": ["baseline_matched", "baseline_gated"],
        "horizon": "longest",
        "min_tokens": 100_000_000,
        "verdict": "held at our scale",
    },
}


def synthetic_grid(
    levels: dict[str, dict[int, float]],
    *,
    seeds=(0, 1, 2),
    lrs=(1e-3, 2e-3),
    horizons=(SHORT, LONG),
    noise: float = 0.001,
    flip: tuple[str, int] | None = None,
    tokens_per_step: int = TOKENS_PER_STEP,
) -> Grid:
    """Finished runs whose final losses are ``levels[variant][steps]`` at lr 1e-3 (2e-3 is 0.05 worse on both
    halves), plus a per-seed offset shared by all variants (the seed fixes the data order) and a little noise.
    ``flip = (variant, seed)`` makes that one run 0.5 worse."""
    rng = random.Random(1234)
    offsets = {s: rng.gauss(0, 0.03) for s in seeds}
    runs = []
    for variant, by_steps in levels.items():
        for steps in horizons:
            for lr in lrs:
                for seed in seeds:
                    loss = by_steps[steps] + offsets[seed] + (0.05 if lr == 2e-3 else 0.0) + rng.gauss(0, noise)
                    loss += 0.5 if flip == (variant, seed) else 0.0
                    run = RunResult(f"{variant}/{steps}/{lr}/{seed}", variant, lr, seed, Path("."), "finished", steps)
                    run.summary = {
                        "val_loss": loss,
                        "val_loss_select": loss + rng.gauss(0, noise),
                        "val_loss_test": loss,
                    }
                    # a curve falling as a power law to the final loss
                    points = [steps // 4, steps // 2, 3 * steps // 4, steps]
                    run.evals = {"step": points, "val_loss_test": [loss + 0.3 * (steps / p - 1) for p in points]}
                    runs.append(run)
    return Grid(
        Path("."),
        list(levels),
        list(lrs),
        list(seeds),
        "baseline_matched",
        runs,
        {},
        {},
        tokens_per_step,
        horizons=sorted(horizons),
    )


def verdicts(grid: Grid, rules: dict = RULES) -> dict[str, str]:
    rule_set = parse_rules(rules, grid.variants)
    findings = claims.evaluate(grid, rule_set)
    return {v.rule.name: v.verdict for v in evaluate_rules(grid, rule_set, findings)}


def levels(zero_gap: float, gated: tuple[float, float], gap: tuple[float, float]) -> dict[str, dict[int, float]]:
    """Losses: the baseline at 3.8 (short) / 3.3 (long); DIFF V2 ``gap`` below it; the gated baseline ``gated``
    below it; the zero-init pair ``zero_gap`` apart."""
    base = {SHORT: 3.8, LONG: 3.3}
    return {
        "baseline_matched": base,
        "diff_v2": {SHORT: base[SHORT] - gap[0], LONG: base[LONG] - gap[1]},
        "baseline_zero_out": {SHORT: 3.7, LONG: 3.25},
        "diff_v2_zero_out": {SHORT: 3.7 - zero_gap, LONG: 3.25 - zero_gap},
        "baseline_gated": {SHORT: base[SHORT] - gated[0], LONG: base[LONG] - gated[1]},
    }


def test_every_rule_reaches_its_verdict():
    grid = synthetic_grid(levels(zero_gap=0.02, gated=(0.25, 0.08), gap=(0.3, 0.1)))
    assert verdicts(grid) == {
        "init_artefact": "init artefact",
        "gating": "gating, not subtraction",
        "horizon": "horizon-limited",
        "loss_claim": "held at our scale",
    }


def test_the_opposite_results_are_not_shown():
    grid = synthetic_grid(levels(zero_gap=0.25, gated=(0.25, 0.01), gap=(0.3, 0.25)))
    assert verdicts(grid) == {
        "init_artefact": "not shown",
        "gating": "not shown",
        "horizon": "not shown",
        "loss_claim": "held at our scale",
    }


def test_the_claim_needs_every_seed():
    grid = synthetic_grid(levels(zero_gap=0.02, gated=(0.25, 0.08), gap=(0.3, 0.1)), flip=("diff_v2", 1))
    assert verdicts(grid)["loss_claim"] == "not shown"


def test_small_budgets_and_short_horizons_are_said_so():
    short_only = synthetic_grid(levels(0.02, (0.25, 0.08), (0.3, 0.1)), horizons=(SHORT,))
    out = verdicts(short_only)
    assert out["horizon"] == NOT_TESTABLE and out["loss_claim"] == NOT_TESTABLE
    assert out["init_artefact"] == "init artefact"
    tiny = synthetic_grid(levels(0.02, (0.25, 0.08), (0.3, 0.1)), tokens_per_step=128)
    assert set(verdicts(tiny).values()) == {NOT_MEANINGFUL}


def test_no_gap_to_explain_and_too_few_seeds_are_not_testable():
    no_gap = synthetic_grid(levels(0.02, (0.25, 0.08), (-0.05, -0.05)))
    out = verdicts(no_gap)
    assert out["init_artefact"] == NOT_TESTABLE and out["gating"] == NOT_TESTABLE
    assert out["loss_claim"] == "not shown"
    one_seed = synthetic_grid(levels(0.02, (0.25, 0.08), (0.3, 0.1)), seeds=(0,))
    assert set(verdicts(one_seed).values()) == {NOT_TESTABLE}


def test_lr_is_chosen_on_the_select_half():
    grid = synthetic_grid(levels(0.02, (0.25, 0.08), (0.3, 0.1)))
    for run in grid.runs:
        if run.variant == "diff_v2" and run.lr == 2e-3:
            run.summary["val_loss_select"] -= 1.0  # best on select, worse on test
    assert best_lr(grid, "diff_v2", SHORT) == 2e-3 and best_lr(grid, "baseline_matched", SHORT) == 1e-3
    c = contrast(grid, "diff_v2", "baseline_matched", SHORT)
    assert (c.lr_a, c.lr_b) == (2e-3, 1e-3) and c.result.mean == pytest.approx(-0.3 + 0.05, abs=0.02)


def test_holm_family_and_rule_rows():
    grid = synthetic_grid(levels(0.02, (0.25, 0.08), (0.3, 0.1)))
    rule_set = parse_rules(RULES, grid.variants)
    findings = claims.evaluate(grid, rule_set)
    tested = [f for f in findings if f.in_family]
    assert {(f.check.a, f.check.b) for f in tested} == {("diff_v2", "baseline_matched"), ("diff_v2", "baseline_gated")}
    assert len(tested) == 4  # two contrasts × two horizons
    raw = sorted(f.contrast.result.p for f in tested)
    assert min(f.p_adjusted for f in tested) == pytest.approx(4 * raw[0])  # Holm: the smallest p times m


def test_bad_rules_fail_early():
    good = {
        "kind": "gap_ratio",
        "pair": ["diff_v2", "baseline_matched"],
        "reference": ["baseline_gated", "baseline_matched"],
        "at_most": 0.5,
        "verdict": "x",
    }
    for broken, match in [
        ({"kind": "vote"}, "kind"),
        ({**good, "verdict": ""}, "verdict"),
        ({**good, "at_least": 0.1}, "exactly one"),
        ({**good, "pair": ["diff_v3", "diff_v2"]}, "not in compare.variants"),
        ({**good, "colour": 1}, "unknown field"),
        ({**good, "reference": good["pair"]}, "its own reference"),
        ({**good, "horizon": "middle"}, "horizon"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_rules({"r": broken}, VARIANTS)
    with pytest.raises(ConfigError, match="alpha"):
        parse_rules({"alpha": 2}, VARIANTS)
    rule = parse_rules({"r": good}, VARIANTS).rules[0]
    assert "`baseline_matched` − `diff_v2`" in rule.describe() and "<= 0.5" in rule.describe()


# ---------------------------------------------------------------------- curves
def test_curve_readings():
    xs, ys = [100, 200, 400, 800], [4.0, 3.5, 3.0, 2.5]
    assert value_at(xs, ys, 200) == 3.5 and value_at(xs, ys, 283) == pytest.approx(3.25, abs=0.01)
    assert value_at(xs, ys, 50) is None and value_at(xs, ys, 900) is None
    assert first_reach(xs, ys, 3.25) == pytest.approx(282.84, abs=0.1) and first_reach(xs, ys, 2.0) is None
    steps = list(range(1, 201))
    flags = [1.0 if s in (5, 50, 150) else 0.0 for s in steps]
    assert spikes_after_warmup(steps, flags, warmup=20) == 2
    growing = [1.0 if s <= 20 else 0.5 * 2 ** ((s - 20) / 180) for s in steps]  # doubles after warmup
    growth = grad_growth(steps, growing, warmup=20)
    assert growth.ratio == pytest.approx(2**0.8, rel=0.05) and growth.slope == pytest.approx(
        1000 * 0.30103 / 180, rel=0.01
    )
    assert grad_growth(steps[:25], growing[:25], warmup=20) is None


def test_equal_flops_and_effective_tokens():
    grid = synthetic_grid(levels(0.02, (0.25, 0.08), (0.3, 0.1)), noise=0.0)
    fpt = {"baseline_matched": 1.0, "diff_v2": 1.16}
    readings = budget_readings(grid, "diff_v2", "baseline_matched", SHORT, fpt)
    assert len(readings) == 3
    finals = {r.seed: r.summary["val_loss_test"] for r in grid.select("diff_v2", 1e-3, SHORT)}
    for r in readings:
        assert not r.reached and r.multiplier == pytest.approx(1.0)  # the baseline never gets 0.3 lower
        assert r.flops == pytest.approx(SHORT * TOKENS_PER_STEP)  # the cheaper model's whole budget
        assert r.loss_variant > finals[r.seed]  # DIFF V2 read earlier on its curve, at the baseline's FLOPs
        assert r.loss_reference == pytest.approx(finals[r.seed] + 0.3)
    # the other way round the multiplier is measured: DIFF V2's curve reaches the baseline's final loss early
    worse = budget_readings(grid, "baseline_matched", "diff_v2", SHORT, {**fpt, "diff_v2": 1.0})
    assert all(r.reached and r.multiplier < 1 for r in worse)


# ---------------------------------------------------------------------- the CPU smoke grid, end to end
def test_the_smoke_config_runs_end_to_end(tmp_path):
    """configs/compare_smoke.toml as written (on a small text folder): every run finishes, and the report prints
    the rules, then a verdict for each: "not meaningful at this budget", since the budget is tiny."""
    import dataclasses

    import torch

    from diffv2.compare import load_compare_config, run_grid, write_report
    from diffv2.data import default_corpus_documents

    text = tmp_path / "text"
    text.mkdir()
    for i, doc in enumerate(default_corpus_documents()[:2]):
        for part in range(5):
            (text / f"book{i}_{part}.txt").write_text(doc[800 * part : 800 * (part + 1)], encoding="utf-8")
    cfg = load_compare_config(Path(__file__).resolve().parents[1] / "configs" / "compare_smoke.toml")
    cfg.base = dataclasses.replace(cfg.base, data=str(text))
    cfg.out_dir = str(tmp_path / "out")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only wait on each other
    try:
        outcomes = run_grid(cfg, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert len(outcomes) == 5 * 2 * 2 * 2 and {o.after for o in outcomes} == {"done"}
    report = write_report(cfg.out_dir, probe=False).read_text(encoding="utf-8")
    rules = report.split("## Decision rules and verdicts")[1].split("\n## ")[0]
    for name in ("init_artefact", "gating_not_subtraction", "horizon_limited", "loss_claim"):
        assert f"`{name}`: **" in rules  # the rule, in words
        row = next(line for line in rules.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"**{NOT_MEANINGFUL}**" in row, row
    assert rules.index("1. `init_artefact`") < rules.index("| rule | verdict | evidence |")  # rules, then verdicts
    assert "First recorded" in rules and "when 0 of 40 runs had finished" in rules
    assert "## Final loss at 512 tokens (4 steps)" in report and "## Final loss at 768 tokens (6 steps)" in report
    assert report.count(NOT_MEANINGFUL) >= 4
