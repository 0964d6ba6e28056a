"""Pure functions over logged curves: post-warmup spikes and gradient-norm growth, and reading a loss curve at a
given token or FLOP count (or the tokens it takes to reach a loss).

Warmup steps are left out of every stability measure: the loss falls fastest there and the learning rate is
still rising, so a spike detector (k × the running median) and a growth trend would mostly measure the warmup.
A spike detector cannot see a slow rise of the gradient norm either; the late/early median ratio and the slope of
log10(grad norm) can.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def after_warmup(steps: Sequence[float], values: Sequence[float], warmup: int) -> tuple[list[float], list[float]]:
    """The (step, value) pairs after the warmup (step > warmup) whose value is finite."""
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if s > warmup and v is not None and math.isfinite(v)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def spikes_after_warmup(steps: Sequence[float], flags: Sequence[float], warmup: int) -> int:
    """How many steps after the warmup were flagged as spikes."""
    return int(sum(f for s, f in zip(steps, flags, strict=True) if s > warmup))


@dataclass
class Growth:
    ratio: float  # median of the last `fraction` of post-warmup steps / median of the first `fraction`
    slope: float  # least-squares slope of log10(grad norm), decades per 1000 steps
    n: int


def grad_growth(
    steps: Sequence[float], grad_norms: Sequence[float], warmup: int, fraction: float = 0.2
) -> Growth | None:
    """How the gradient norm moves after the warmup; None with fewer than 10 post-warmup steps."""
    s, g = after_warmup(steps, grad_norms, warmup)
    pairs = [(x, y) for x, y in zip(s, g, strict=True) if y > 0]
    if len(pairs) < 10:
        return None
    k = max(1, int(len(pairs) * fraction))
    early = statistics.median(y for _, y in pairs[:k])
    late = statistics.median(y for _, y in pairs[-k:])
    xs = [x / 1000 for x, _ in pairs]
    ys = [math.log10(y) for _, y in pairs]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx > 0 else 0.0
    return Growth(late / early, slope, len(pairs))


def value_at(xs: Sequence[float], ys: Sequence[float], at: float) -> float | None:
    """The curve (x increasing) read at ``at``, linearly interpolated in log x; None outside the logged range."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x > 0 and y is not None and math.isfinite(y)]
    if not pts or at < pts[0][0] or at > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if x0 <= at <= x1:
            w = 0.0 if x1 == x0 else (math.log(at) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return pts[-1][1]  # at equals the only point


def first_reach(xs: Sequence[float], ys: Sequence[float], target: float) -> float | None:
    """The first x (interpolated in log x) where the curve comes down to ``target``; None if it never does."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if x > 0 and y is not None and math.isfinite(y)]
    if not pts:
        return None
    if pts[0][1] <= target:
        return pts[0][0]
    for (x0, y0), (x1, y1) in itertools.pairwise(pts):
        if y1 <= target < y0:
            w = (y0 - target) / (y0 - y1)
            return math.exp(math.log(x0) + w * (math.log(x1) - math.log(x0)))
    return None
