"""Fixed-horizon tests and checks for experiment reports.

Each result is a small frozen dataclass whose fields say what they are, and
`as_dict()` labels them for JSON. Differences are always candidate minus control.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from edgeserve.experiments.distributions import (
    chi_square_p,
    normal_quantile,
    normal_two_sided_p,
    student_t_quantile,
    student_t_two_sided_p,
)


def json_safe(value: Any) -> Any:
    """A result as strict JSON wants it: inf and nan (an unbounded interval, an undefined
    ratio) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class ComparisonResult:
    """A fixed-horizon comparison of one metric between candidate and control."""

    test: str  # "two-proportion z-test" | "Welch t-test"
    control_estimate: float
    candidate_estimate: float
    absolute_difference: float
    absolute_ci: Interval
    relative_difference: float | None  # (candidate - control) / control
    relative_ci: Interval | None  # delta method
    statistic: float
    degrees_of_freedom: float | None
    p_value: float
    confidence_level: float

    FIELDS: ClassVar[dict[str, str]] = {
        "test": "which fixed-horizon test",
        "control_estimate": "control's rate or mean",
        "candidate_estimate": "candidate's rate or mean",
        "absolute_difference": "candidate minus control",
        "absolute_ci": "confidence interval of the absolute difference",
        "relative_difference": "(candidate - control) / control; None if control is 0",
        "relative_ci": "confidence interval of the relative difference (delta method)",
        "statistic": "z (pooled standard error) or Welch's t",
        "degrees_of_freedom": "Welch-Satterthwaite degrees of freedom; None for z",
        "p_value": "two-sided p, valid only when looked at once at the planned size",
        "confidence_level": "1 - alpha of the intervals",
    }

    def as_dict(self) -> dict:
        return json_safe(asdict(self))


def relative_lift(
    mean_c: float, var_c: float, mean_t: float, var_t: float, crit: float
) -> tuple[float | None, Interval | None]:
    """Relative lift and its delta-method CI: Var(t/c) ~ var_t/c^2 + t^2 var_c / c^4."""
    if mean_c == 0:
        return None, None
    ratio = mean_t / mean_c
    se = math.sqrt(var_t / mean_c**2 + mean_t**2 * var_c / mean_c**4)
    return ratio - 1.0, Interval(ratio - 1.0 - crit * se, ratio - 1.0 + crit * se)


def two_proportion_ztest(
    successes_c: int, trials_c: int, successes_t: int, trials_t: int, alpha: float = 0.05
) -> ComparisonResult:
    """z-test with the pooled standard error; CI with the unpooled one (Wald)."""
    if min(trials_c, trials_t) <= 0:
        raise ValueError("both variants need at least one trial")
    p_c, p_t = successes_c / trials_c, successes_t / trials_t
    pooled = (successes_c + successes_t) / (trials_c + trials_t)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / trials_c + 1 / trials_t))
    z = (p_t - p_c) / se_pooled if se_pooled > 0 else 0.0
    var_c, var_t = p_c * (1 - p_c) / trials_c, p_t * (1 - p_t) / trials_t
    se = math.sqrt(var_c + var_t)
    crit = normal_quantile(1 - alpha / 2)
    diff = p_t - p_c
    rel, rel_ci = relative_lift(p_c, var_c, p_t, var_t, crit)
    return ComparisonResult(
        "two-proportion z-test",
        p_c,
        p_t,
        diff,
        Interval(diff - crit * se, diff + crit * se),
        rel,
        rel_ci,
        z,
        None,
        normal_two_sided_p(z),
        1 - alpha,
    )


def welch_ttest(
    mean_c: float,
    var_c: float,
    n_c: int,
    mean_t: float,
    var_t: float,
    n_t: int,
    alpha: float = 0.05,
) -> ComparisonResult:
    """Welch's t-test from summary statistics (sample variances, ddof=1)."""
    if min(n_c, n_t) < 2:
        raise ValueError("both variants need at least two observations")
    se_c, se_t = var_c / n_c, var_t / n_t
    se = math.sqrt(se_c + se_t)
    diff = mean_t - mean_c
    t = diff / se if se > 0 else 0.0
    df = (
        (se_c + se_t) ** 2 / (se_c**2 / (n_c - 1) + se_t**2 / (n_t - 1))
        if se > 0
        else float(n_c + n_t - 2)
    )
    crit = student_t_quantile(1 - alpha / 2, df)
    rel, rel_ci = relative_lift(mean_c, se_c, mean_t, se_t, crit)
    return ComparisonResult(
        "Welch t-test",
        mean_c,
        mean_t,
        diff,
        Interval(diff - crit * se, diff + crit * se),
        rel,
        rel_ci,
        t,
        df,
        student_t_two_sided_p(t, df),
        1 - alpha,
    )


@dataclass(frozen=True)
class SampleRatioCheck:
    """Chi-square goodness of fit of observed counts against the configured weights."""

    observed: list[int]
    expected: list[float]
    statistic: float
    p_value: float
    mismatch: bool  # p < threshold: assignment or logging is broken; do not trust results
    threshold: float
    test: str = "Pearson chi-square"

    FIELDS: ClassVar[dict[str, str]] = {
        "observed": "units (or requests) seen per variant",
        "expected": "what the configured weights predict for the same total",
        "statistic": "Pearson chi-square, or the log Bayes factor of the sequential test",
        "p_value": "chance of a split at least this far off with correct assignment",
        "mismatch": "p below threshold: assignment or logging is broken, do not trust results",
        "threshold": "p below which a mismatch is flagged",
        "test": "chi-square (valid at one look) or sequential (valid at every look)",
    }

    def as_dict(self) -> dict:
        return json_safe(asdict(self))


def sample_ratio_mismatch(
    observed: Sequence[int], weights: Sequence[float], threshold: float = 0.001
) -> SampleRatioCheck:
    """A variant with weight 0 takes no part in the test, unless it received traffic:
    then assignment is certainly broken (statistic inf, p 0)."""
    total = sum(observed)
    wsum = sum(weights)
    expected = [total * w / wsum for w in weights]
    pairs = list(zip(observed, expected, strict=True))
    if any(o > 0 and e == 0 for o, e in pairs):
        return SampleRatioCheck(list(observed), expected, math.inf, 0.0, True, threshold)
    statistic = sum((o - e) ** 2 / e for o, e in pairs if e > 0)
    categories = sum(1 for _, e in pairs if e > 0)
    p = chi_square_p(statistic, categories - 1) if total and categories > 1 else 1.0
    return SampleRatioCheck(list(observed), expected, statistic, p, p < threshold, threshold)


def sequential_sample_ratio_mismatch(
    observed: Sequence[int],
    weights: Sequence[float],
    threshold: float = 0.001,
    concentration: float = 100.0,
) -> SampleRatioCheck:
    """SRM that stays valid when checked at every decision interval: the Dirichlet-
    multinomial mixture Bayes factor of Lindon & Malek ("Anytime-Valid Inference for
    Multinomial Count Data", NeurIPS 2022; Optimizely's SSRM), prior centred on the
    weights with `concentration` pseudo-counts. p = 1/BF: by Ville's inequality the
    chance it ever falls below alpha under correct assignment is at most alpha."""
    total = sum(observed)
    wsum = sum(weights)
    expected = [total * w / wsum for w in weights]
    if any(o > 0 and w == 0 for o, w in zip(observed, weights, strict=True)):
        return SampleRatioCheck(
            list(observed), expected, math.inf, 0.0, True, threshold, "sequential"
        )
    pairs = [(o, w / wsum) for o, w in zip(observed, weights, strict=True) if w > 0]
    alphas = [concentration * p for _, p in pairs]
    log_bf = math.lgamma(sum(alphas)) - math.lgamma(sum(alphas) + total)
    for (o, p), a in zip(pairs, alphas, strict=True):
        log_bf += math.lgamma(a + o) - math.lgamma(a) - o * math.log(p)
    p_value = min(1.0, math.exp(-log_bf)) if log_bf > -700 else 1.0
    return SampleRatioCheck(
        list(observed), expected, log_bf, p_value, p_value < threshold, threshold, "sequential"
    )


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i], reverse=True)
    adjusted = [0.0] * m
    running = 1.0
    for rank, i in enumerate(order):
        running = min(running, p_values[i] * m / (m - rank))
        adjusted[i] = running
    return adjusted


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    m = len(p_values)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def sample_size_proportions(
    p_control: float,
    p_candidate: float,
    alpha: float = 0.05,
    power: float = 0.8,
    share_candidate: float = 0.5,
) -> int:
    """Total units needed to detect p_control -> p_candidate with the two-sided pooled
    z-test above: the null spread uses the pooled rate (as the test does), the
    alternative's the two rates, so unequal splits get the power they ask for
    (Fleiss, Statistical Methods for Rates and Proportions, 3rd ed., eq. 4.19)."""
    delta = abs(p_candidate - p_control)
    if delta == 0:
        raise ValueError("the two proportions must differ")
    za, zb = normal_quantile(1 - alpha / 2), normal_quantile(power)
    k = share_candidate
    pooled = (1 - k) * p_control + k * p_candidate
    null_sd = math.sqrt(pooled * (1 - pooled) * (1 / (1 - k) + 1 / k))
    alt_sd = math.sqrt(p_control * (1 - p_control) / (1 - k) + p_candidate * (1 - p_candidate) / k)
    return math.ceil((za * null_sd + zb * alt_sd) ** 2 / delta**2)


def sample_size_means(
    sd: float,
    min_difference: float,
    alpha: float = 0.05,
    power: float = 0.8,
    share_candidate: float = 0.5,
) -> int:
    """Total units needed to detect a difference in means of `min_difference`."""
    za, zb = normal_quantile(1 - alpha / 2), normal_quantile(power)
    k = share_candidate
    return math.ceil((za + zb) ** 2 * sd**2 * (1 / k + 1 / (1 - k)) / min_difference**2)
