"""What the report and the decision rules compute from a grid: each variant's learning rate chosen on the select
half, paired contrasts over seeds scored on the test half, loss at equal FLOPs and an effective-token multiplier.

Selection and scoring use disjoint documents: a variant's lr is the one with the lowest mean *select*-half loss
over seeds, and every comparison is made on the *test* half. (A grid whose runs predate the halves selects and
scores on the same tokens; :func:`halves_available` tells the report to say so.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .curves import first_reach, value_at
from .results import Grid, RunResult
from .stats import Paired, paired

Metric = Callable[[RunResult], float | None]


def test_loss(run: RunResult) -> float | None:
    return run.final_loss("test")


def select_loss(run: RunResult) -> float | None:
    return run.final_loss("select")


def halves_available(grid: Grid) -> bool:
    finished = [r for r in grid.runs if r.status == "finished"]
    return bool(finished) and all(r.has_halves for r in finished)


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def best_lr(grid: Grid, variant: str, steps: int) -> float | None:
    """The lr with the lowest mean select-half loss over the variant's finished seeds (None: nothing to choose
    from). With one lr in the grid, that lr as soon as one of its runs finished: there is nothing to select."""
    if len(grid.lrs) == 1:
        return grid.lrs[0] if any(r.status == "finished" for r in grid.select(variant, grid.lrs[0], steps)) else None
    means = {}
    for lr in grid.lrs:
        value = mean([v for r in grid.select(variant, lr, steps) if (v := select_loss(r)) is not None])
        if value is not None:
            means[lr] = value
    return min(means, key=lambda lr: (means[lr], lr)) if means else None


def per_seed(grid: Grid, variant: str, lr: float | None, steps: int, metric: Metric = test_loss) -> dict[int, float]:
    if lr is None:
        return {}
    return {r.seed: v for r in grid.select(variant, lr, steps) if (v := metric(r)) is not None}


@dataclass
class Contrast:
    """``a − b`` on ``metric`` at one horizon, each variant at its own lr (its best, unless fixed), paired by seed."""

    a: str
    b: str
    steps: int
    lr_a: float | None
    lr_b: float | None
    result: Paired
    a_values: dict[int, float]
    b_values: dict[int, float]


def contrast(grid: Grid, a: str, b: str, steps: int, metric: Metric = test_loss, lr: float | None = None) -> Contrast:
    """``metric(a) − metric(b)`` per seed; both at ``lr`` if given, else each at its best lr."""
    lr_a = lr if lr is not None else best_lr(grid, a, steps)
    lr_b = lr if lr is not None else best_lr(grid, b, steps)
    va, vb = per_seed(grid, a, lr_a, steps, metric), per_seed(grid, b, lr_b, steps, metric)
    return Contrast(a, b, steps, lr_a, lr_b, paired(va, vb), va, vb)


# ---------------------------------------------------------------------- curves: equal FLOPs, effective tokens
def curve(grid: Grid, run: RunResult, key: str = "val_loss_test") -> tuple[list[float], list[float]]:
    """A run's validation curve against training tokens (``key`` falls back to the whole split's loss)."""
    values = run.evals.get(key, [])
    if not values or all(v is None for v in values):
        values = run.evals.get("val_loss", [])
    return [s * grid.tokens_per_step for s in run.evals.get("step", [])], values


@dataclass
class BudgetReading:
    """Per seed: the variant's and the reference's loss at equal FLOPs, and the effective-token multiplier."""

    seed: int
    flops: float  # the FLOP budget both reached: the smaller of the two runs' totals
    loss_variant: float | None
    loss_reference: float | None
    multiplier: float | None  # reference tokens to reach the variant's final loss / the variant's tokens
    reached: bool  # False: the reference never came down to the variant's final loss; multiplier is a lower bound


def budget_readings(
    grid: Grid, variant: str, reference: str, steps: int, flops_per_token: dict[str, float]
) -> list[BudgetReading]:
    """Equal-FLOPs losses and effective-token multipliers of ``variant`` against ``reference``, per seed.

    Both are read off the runs' own curves, whose cosine schedule has not finished decaying at intermediate
    points: a run stopped there at its own schedule's end would do better, so an equal-FLOPs reading of the
    costlier variant is pessimistic for it, and the multiplier compares partly-annealed points.
    """
    lr_v, lr_r = best_lr(grid, variant, steps), best_lr(grid, reference, steps)
    runs_v = {r.seed: r for r in grid.select(variant, lr_v, steps) if r.status == "finished"} if lr_v else {}
    runs_r = {r.seed: r for r in grid.select(reference, lr_r, steps) if r.status == "finished"} if lr_r else {}
    out = []
    for seed in sorted(set(runs_v) & set(runs_r)):
        tv, lv = curve(grid, runs_v[seed])
        tr, lr_curve = curve(grid, runs_r[seed])
        if not tv or not tr:
            continue
        fv, fr = flops_per_token[variant], flops_per_token[reference]
        budget = min(tv[-1] * fv, tr[-1] * fr)
        final_v = lv[-1]
        reach = first_reach(tr, lr_curve, final_v) if final_v is not None else None
        multiplier = reach / tv[-1] if reach is not None else tr[-1] / tv[-1]
        out.append(
            BudgetReading(
                seed,
                budget,
                value_at(tv, lv, budget / fv),
                value_at(tr, lr_curve, budget / fr),
                multiplier,
                reach is not None,
            )
        )
    return out


def summarize_readings(readings: list[BudgetReading]) -> dict[str, float | bool | None]:
    """Mean Δ at equal FLOPs (variant − reference) and the multiplier's mean and range over seeds."""
    deltas = [
        r.loss_variant - r.loss_reference
        for r in readings
        if r.loss_variant is not None and r.loss_reference is not None
    ]
    mults = [r.multiplier for r in readings if r.multiplier is not None and math.isfinite(r.multiplier)]
    return {
        "n": len(readings),
        "flops": mean([r.flops for r in readings]),
        "delta_equal_flops": mean(deltas),
        "multiplier": mean(mults),
        "multiplier_min": min(mults) if mults else None,
        "multiplier_max": max(mults) if mults else None,
        "all_reached": all(r.reached for r in readings),
    }
