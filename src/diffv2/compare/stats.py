"""Small-sample statistics for comparing variants over seeds: mean ± std and Welch's t-test.

With a handful of seeds per variant a t-test is the honest tool (a bootstrap over 3 values says little). scipy's
t distribution is used when scipy is installed; otherwise a self-contained one (the regularized incomplete beta
function by its continued fraction), which the tests check against scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Summary:
    n: int
    mean: float | None
    std: float | None  # sample std (ddof=1); None for n < 2

    def fmt(self, digits: int = 4) -> str:
        if self.mean is None:
            return "–"
        if self.std is None:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def summarize(values: list[float]) -> Summary:
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return Summary(0, None, None)
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return Summary(len(xs), mean, std)


@dataclass
class Comparison:
    """``a − b`` with Welch's t-test; ``p``/``ci`` are None when the data cannot support them (see ``note``)."""

    diff: float | None
    se: float | None = None
    df: float | None = None
    t: float | None = None
    p: float | None = None
    ci: tuple[float, float] | None = None  # 95% confidence interval of the difference
    note: str = ""

    def fmt_p(self) -> str:
        if self.p is None:
            return self.note or "–"
        return "< 0.001" if self.p < 0.001 else f"{self.p:.3f}"

    def fmt_ci(self, digits: int = 4) -> str:
        return "–" if self.ci is None else f"[{self.ci[0]:+.{digits}f}, {self.ci[1]:+.{digits}f}]"


def welch(a: list[float], b: list[float], level: float = 0.95) -> Comparison:
    """Welch's unequal-variance t-test of mean(a) − mean(b), two-sided."""
    sa, sb = summarize(a), summarize(b)
    if sa.mean is None or sb.mean is None:
        return Comparison(None, note="no data")
    diff = sa.mean - sb.mean
    if sa.std is None or sb.std is None:
        return Comparison(diff, note="n too small")
    va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison(diff, se=0.0, note="zero variance")
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    t = diff / se
    q = t_ppf(0.5 + level / 2, df)
    return Comparison(diff, se, df, t, 2 * t_sf(abs(t), df), (diff - q * se, diff + q * se))


# ---------------------------------------------------------------------- the t distribution
def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    try:
        from scipy.stats import t as student
    except ImportError:
        tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))
        return tail if t >= 0 else 1 - tail
    return float(student.sf(t, df))


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (0 < q < 1)."""
    try:
        from scipy.stats import t as student
    except ImportError:
        # t_sf is monotone: bisect on a bracket that doubles until it holds the quantile
        target = 1 - q
        lo, hi = -1.0, 1.0
        while t_sf(hi, df) > target:
            hi *= 2
        while t_sf(lo, df) < target:
            lo *= 2
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if t_sf(mid, df) > target else (lo, mid)
        return (lo + hi) / 2
    return float(student.ppf(q, df))


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    log_front = a * math.log(x) + b * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))
    # The continued fraction converges fast only below the mean of the beta distribution; use symmetry above it.
    if x > (a + 1) / (a + b + 2):
        return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b
    return math.exp(log_front) * _beta_fraction(a, b, x) / a


def _beta_fraction(a: float, b: float, x: float, tol: float = 1e-14, max_terms: int = 500) -> float:
    """1 / (1 + d1 / (1 + d2 / (1 + ...))) with the incomplete beta's coefficients, by the modified Lentz method."""
    tiny = 1e-300

    def coefficient(k: int) -> float:
        m = k // 2
        if k % 2:  # odd terms
            return -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        return m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))

    # b0 + a1/(b1 + a2/(b2 + ...)) with b0 = 0, a1 = 1, every b = 1 and a_k = d_(k-1); Lentz starts from f = C = tiny
    value, c, d = tiny, tiny, 0.0
    for k in range(1, 2 * max_terms):
        num = 1.0 if k == 1 else coefficient(k - 1)
        d = 1.0 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        step = c * d
        value *= step
        if abs(step - 1) < tol:
            break
    return value
