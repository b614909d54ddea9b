"""A test on the p99 latency itself, not on mean latency: does the candidate exceed a
high quantile more often than the control?

Mood's quantile test (the median test generalised to any quantile, Mood 1950): pool
both variants' request latencies, take the pooled `q` quantile as the threshold and count
each variant's requests above it. If both variants share one latency distribution, every
split of the pooled requests is equally likely, so the candidate's count of exceedances
is hypergeometric given the total; the one-sided p-value is its upper tail (exact, no
normal approximation: exceedances of a 99th percentile are rare). A small p says the
candidate's tail is heavier, i.e. its p99 is higher.

Requests are the samples (latency is the server's, not the user's). The p-value is
fixed-horizon: valid at one look at the planned size, like `fixed_horizon` in the
report, so the report shows it and the decision engine does not act on it (the absolute
`max_p99_ms` guardrail and the sequential latency guardrail do).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np

from edgeserve.experiments.stats import json_safe


@dataclass(frozen=True)
class QuantileTest:
    """The candidate's exceedances of the pooled quantile against the control's."""

    quantile: float
    threshold_ms: float
    control_requests: int
    control_exceedances: int
    candidate_requests: int
    candidate_exceedances: int
    p_value: float
    worse: bool
    test: str = "Mood quantile test (hypergeometric, one-sided)"

    FIELDS: ClassVar[dict[str, str]] = {
        "threshold_ms": "the pooled quantile of both variants' latencies",
        "control_exceedances": "control requests slower than the threshold",
        "candidate_exceedances": "candidate requests slower than the threshold",
        "p_value": "one-sided: chance of this many candidate exceedances or more with one "
        "latency distribution; fixed-horizon (one look)",
        "worse": "p_value < alpha: the candidate's p99 is higher",
    }

    def as_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def hypergeometric_upper_tail(k: int, population: int, successes: int, draws: int) -> float:
    """P(X >= k) for X ~ Hypergeometric(population, successes, draws)."""
    low, high = max(0, draws - (population - successes)), min(draws, successes)
    if k <= low:
        return 1.0
    if k > high:
        return 0.0

    def log_choose(n: int, r: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)

    total = log_choose(population, draws)
    terms = [
        log_choose(successes, i) + log_choose(population - successes, draws - i) - total
        for i in range(k, high + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def quantile_test(
    control_s: np.ndarray, candidate_s: np.ndarray, alpha: float = 0.05, q: float = 99.0
) -> QuantileTest | None:
    """Mood's test at the `q` percentile; None until both variants have latencies."""
    if not control_s.size or not candidate_s.size:
        return None
    threshold = float(np.percentile(np.concatenate([control_s, candidate_s]), q))
    k_c = int((control_s > threshold).sum())
    k_t = int((candidate_s > threshold).sum())
    n_c, n_t = int(control_s.size), int(candidate_s.size)
    p = hypergeometric_upper_tail(k_t, n_c + n_t, k_c + k_t, n_t)
    return QuantileTest(q, threshold * 1000, n_c, k_c, n_t, k_t, p, p < alpha)
