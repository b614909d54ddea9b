"""The few distribution functions the statistics need, in the standard library only.

Student t and chi-square tails through the regularized incomplete beta and gamma
functions (continued fractions, as in Numerical Recipes ch. 6); the normal from
`statistics.NormalDist`. Checked against scipy in the tests.
"""

from __future__ import annotations

import math
from statistics import NormalDist

NORMAL = NormalDist()
_EPS = 1e-14
_TINY = 1e-300


def normal_two_sided_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def normal_quantile(p: float) -> float:
    return NORMAL.inv_cdf(p)


def _nonzero(value: float) -> float:
    return value if abs(value) > _TINY else _TINY


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's method for the continued fraction of the incomplete beta function."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 / _nonzero(1.0 - qab * x / qap)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 / _nonzero(1.0 + aa * d)
            c = _nonzero(1.0 + aa / c)
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_two_sided_p(t: float, df: float) -> float:
    if math.isinf(df):
        return normal_two_sided_p(t)
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def student_t_quantile(p: float, df: float) -> float:
    """Inverse CDF for p in (0.5, 1).

    Newton's method on the two-sided tail, started at the normal quantile: the tail is
    decreasing and convex for t > 0 and the start lies left of the root, so the steps
    climb to it without overshooting, in a handful of iterations (a report computes
    many of these). Bisection is the fallback for extreme inputs."""
    if math.isinf(df):
        return normal_quantile(p)
    target = 2.0 * (1.0 - p)
    log_scale = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    t = normal_quantile(p)
    for _ in range(100):
        density = math.exp(log_scale - (df + 1) / 2 * math.log1p(t * t / df))
        step = (student_t_two_sided_p(t, df) - target) / (2.0 * density)
        if not math.isfinite(step) or step < -1e-9 * t:
            break
        t += step
        if abs(step) <= 1e-13 * t:
            return t
    lo, hi = 0.0, 1.0
    while student_t_two_sided_p(hi, df) > target and hi < 1e12:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if student_t_two_sided_p(mid, df) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-14 * hi:
            break
    return (lo + hi) / 2.0


def regularized_gamma_upper(a: float, x: float) -> float:
    """Q(a, x) = 1 - P(a, x): the chi-square tail is Q(k/2, x/2)."""
    if x <= 0.0:
        return 1.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:  # series for P
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _EPS:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    b = x + 1.0 - a  # continued fraction for Q
    c = 1.0 / _TINY
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = 1.0 / _nonzero(an * d + b)
        c = _nonzero(b + an / c)
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return math.exp(log_front) * h


def chi_square_p(statistic: float, df: int) -> float:
    return regularized_gamma_upper(df / 2.0, statistic / 2.0)
