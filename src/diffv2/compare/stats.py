"""Small-sample statistics for comparing variants over seeds: mean ± std, paired tests, Holm's correction.

Runs of a grid that share a seed share their batch order, so variants are compared per seed (paired), not as
two independent samples. With a handful of seeds a t-test is the usual tool, but its p-value leans on normality
that 2-3 values cannot check; the sign test and the range of the per-seed differences are printed beside it. scipy's
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
class Paired:
    """``a − b`` over the seeds both finished, paired by seed (a seed fixes the batch order for every variant).

    ``mean``/``sd`` of the per-seed differences, their range, a two-sided paired t-test (``p``, 95% t-interval
    ``ci``, n − 1 degrees of freedom) and the exact two-sided sign test ``sign_p`` (distribution-free; with n
    seeds it can never go below 2/2ⁿ). ``p``/``ci`` are None when the data cannot support them (see ``note``).
    """

    n: int
    diffs: list[float]
    seeds: list[int]
    mean: float | None = None
    sd: float | None = None
    t: float | None = None
    p: float | None = None
    ci: tuple[float, float] | None = None
    sign_p: float | None = None
    note: str = ""

    @property
    def range(self) -> tuple[float, float] | None:
        return (min(self.diffs), max(self.diffs)) if self.diffs else None

    def same_sign(self, negative: bool) -> bool:
        """Every seed's difference is strictly below 0 (``negative``) or strictly above it."""
        return bool(self.diffs) and all(d < 0 if negative else d > 0 for d in self.diffs)

    def fmt_ci(self, digits: int = 4) -> str:
        return "–" if self.ci is None else f"[{self.ci[0]:+.{digits}f}, {self.ci[1]:+.{digits}f}]"

    def fmt_range(self, digits: int = 4) -> str:
        r = self.range
        return "–" if r is None else f"[{r[0]:+.{digits}f}, {r[1]:+.{digits}f}]"


def fmt_p(p: float | None, note: str = "") -> str:
    """Two significant digits, never "0"; the note when there is no p."""
    if p is None:
        return note or "–"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def paired(a: dict[int, float | None], b: dict[int, float | None], level: float = 0.95) -> Paired:
    """Paired comparison of two metrics keyed by seed; seeds missing or non-finite on either side drop out."""
    seeds = sorted(s for s in set(a) & set(b) if _finite(a[s]) and _finite(b[s]))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(diffs)
    if n == 0:
        return Paired(0, [], [], note="no data")
    mean = sum(diffs) / n
    result = Paired(n, diffs, seeds, mean=mean, sign_p=sign_test(diffs))
    if n < 2:
        result.note = "n too small"
        return result
    result.sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if result.sd == 0:
        result.note = "zero variance"
        return result
    se = result.sd / math.sqrt(n)
    result.t = mean / se
    result.p = 2 * t_sf(abs(result.t), n - 1)
    q = t_ppf(0.5 + level / 2, n - 1)
    result.ci = (mean - q * se, mean + q * se)
    return result


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def sign_test(diffs: list[float]) -> float | None:
    """Exact two-sided sign test of "the median difference is 0"; zero differences are dropped."""
    signs = [d > 0 for d in diffs if d != 0]
    n = len(signs)
    if n == 0:
        return None
    k = min(sum(signs), n - sum(signs))
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment over a family of tests (None entries are not tests and stay None).

    Sorted ascending, the i-th smallest of m p-values becomes max over j <= i of min(1, (m − j)·p_(j)).
    """
    tests = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tests)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tests):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


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
