"""Always-valid inference: the mixture sequential probability ratio test (mSPRT).

Johari, Koomen, Pekelis, Walsh, "Always Valid Inference: Continuous Monitoring of A/B
Tests" (Operations Research, 2022; the engine behind Optimizely's Stats Engine). For
an estimate d of the difference with variance v (v = s_c^2/n_c + s_t^2/n_t) and a
normal mixing distribution N(0, tau^2) over the true difference, the mixture
likelihood ratio against "no difference" is

    Lambda = sqrt(v / (v + tau^2)) * exp(d^2 * tau^2 / (2 v (v + tau^2)))

and p = min over looks of 1/Lambda is a p-value valid at any stopping time: peeking
after every request does not inflate false positives. Inverting Lambda < 1/alpha gives
the confidence sequence d +/- sqrt(v (v + tau^2) / tau^2 * (2 ln(1/alpha) + ln((v + tau^2)/v))).
tau is the scale of effects worth detecting; here tau = tau_relative * pooled standard
deviation of the metric.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

from edgeserve.experiments.stats import Interval, json_safe
from edgeserve.experiments.units import Ratio


@dataclass(frozen=True)
class SequentialResult:
    """The always-valid test of one metric at the current look."""

    test: str
    difference: float
    variance_of_difference: float
    mixture_tau: float
    likelihood_ratio: float
    always_valid_p_value: float
    confidence_sequence: Interval
    alpha: float
    significant: bool

    FIELDS: ClassVar[dict[str, str]] = {
        "test": "which sequential test",
        "difference": "candidate minus control",
        "variance_of_difference": "estimated variance of the difference",
        "mixture_tau": "standard deviation of the normal mixture over true differences",
        "likelihood_ratio": "mixture likelihood ratio against no difference",
        "always_valid_p_value": "p valid at any look: the running minimum of 1/ratio",
        "confidence_sequence": "interval for the difference valid at any look",
        "alpha": "significance level",
        "significant": "always-valid p below alpha",
    }

    def as_dict(self) -> dict:
        return json_safe(asdict(self))


def mixture_likelihood_ratio(difference: float, variance: float, tau: float) -> float:
    """Lambda of the normal-mixture SPRT (log-space, so huge samples cannot overflow)."""
    if variance <= 0:
        return 1.0
    t2 = tau * tau
    log_ratio = 0.5 * math.log(variance / (variance + t2)) + difference**2 * t2 / (
        2 * variance * (variance + t2)
    )
    return math.exp(min(log_ratio, 700.0))


def msprt(
    difference: float, variance: float, tau: float, alpha: float = 0.05, previous_p: float = 1.0
) -> SequentialResult:
    """The test at this look; `previous_p` carries the running minimum between looks."""
    ratio = mixture_likelihood_ratio(difference, variance, tau)
    p = min(previous_p, 1.0 / ratio if ratio > 0 else 1.0)
    t2 = tau * tau
    if variance > 0:
        half = math.sqrt(
            variance
            * (variance + t2)
            / t2
            * (2 * math.log(1 / alpha) + math.log((variance + t2) / variance))
        )
    else:
        half = math.inf
    return SequentialResult(
        "mixture SPRT (Johari et al.)",
        difference,
        variance,
        tau,
        ratio,
        p,
        Interval(difference - half, difference + half),
        alpha,
        p < alpha,
    )


def msprt_proportions(
    successes_c: int,
    trials_c: int,
    successes_t: int,
    trials_t: int,
    alpha: float = 0.05,
    tau_relative: float = 0.1,
    previous_p: float = 1.0,
) -> SequentialResult:
    p_c, p_t = successes_c / trials_c, successes_t / trials_t
    # Laplace-smoothed rates for the variance only: with 0 errors on both sides the plain
    # estimate is 0 and the interval degenerates to (-inf, inf).
    s_c, s_t = (successes_c + 1) / (trials_c + 2), (successes_t + 1) / (trials_t + 2)
    variance = s_c * (1 - s_c) / trials_c + s_t * (1 - s_t) / trials_t
    pooled = (successes_c + successes_t) / (trials_c + trials_t)
    if pooled in (0.0, 1.0):
        # No spread yet (no errors on either side): the smoothed rate sets the scale, or
        # tau ~ 0 would make the confidence sequence tens of thousands wide.
        pooled = (successes_c + successes_t + 1) / (trials_c + trials_t + 2)
    tau = tau_relative * math.sqrt(max(pooled * (1 - pooled), 1e-12))
    return _within_rates(msprt(p_t - p_c, variance, tau, alpha, previous_p))


def _within_rates(result: SequentialResult) -> SequentialResult:
    """A difference of two rates lies in [-1, 1]: the confidence sequence is cut to it
    (still valid, and no longer wider than the question on a handful of samples)."""
    cs = result.confidence_sequence
    return replace(result, confidence_sequence=Interval(max(cs.low, -1.0), min(cs.high, 1.0)))


def msprt_means(
    mean_c: float,
    var_c: float,
    n_c: int,
    mean_t: float,
    var_t: float,
    n_t: int,
    alpha: float = 0.05,
    tau_relative: float = 0.1,
    previous_p: float = 1.0,
) -> SequentialResult:
    variance = var_c / n_c + var_t / n_t
    sd = math.sqrt(max((var_c * (n_c - 1) + var_t * (n_t - 1)) / max(n_c + n_t - 2, 1), 1e-24))
    return msprt(mean_t - mean_c, variance, tau_relative * sd, alpha, previous_p)


def msprt_ratios(
    control: Ratio,
    candidate: Ratio,
    alpha: float = 0.05,
    tau_relative: float = 0.1,
    previous_p: float = 1.0,
) -> SequentialResult:
    """The test on per-unit ratio metrics (`edgeserve.experiments.units`): delta-method
    variances, tau from the pooled variance of one request's value."""
    variance = control.variance + candidate.variance
    weight = control.x + candidate.x
    element = (
        (control.element_variance * control.x + candidate.element_variance * candidate.x) / weight
        if weight
        else 0.0
    )
    tau = tau_relative * math.sqrt(max(element, 1e-24))
    result = msprt(candidate.value - control.value, variance, tau, alpha, previous_p)
    return _within_rates(result) if control.binary and candidate.binary else result
