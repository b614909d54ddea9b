"""Analysis at the randomisation unit (issue 20): an A/A simulation with heavy-tailed
requests per unit. Users differ (a slow phone, an error-prone integration), so one
user's requests are correlated; analysed as independent requests the sequential test
finds differences that are not there, analysed per unit it keeps its error rate.

Seeded and deterministic; a few hundred runs (well under a second of CPU)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeserve.experiments import sequential
from edgeserve.experiments.decision import Moments, compare
from edgeserve.experiments.units import Ratio

ALPHA = 0.05
RUNS = 200
LOOKS = 10
UNITS = 1500
# The false-positive rate must stay within sampling error of alpha: 2 standard errors.
BOUND = ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / RUNS)


def _population(rng: np.random.Generator, binary: bool) -> tuple[np.ndarray, ...]:
    """Per-unit request counts (Pareto, capped at 500), per-unit sums of the metric and
    of its squares, and a fair coin per unit for the arm (an A/A test)."""
    k = np.minimum(np.floor(rng.pareto(1.1, UNITS) + 1), 500).astype(int)
    arm = rng.random(UNITS) < 0.5
    if binary:  # errors: each unit has its own error probability
        y = rng.binomial(k, rng.beta(0.5, 4.5, UNITS)).astype(float)
        return k, y, y, arm
    unit_mean = rng.lognormal(3.0, 0.8, UNITS)  # latency: each unit its own typical ms
    owner = np.repeat(np.arange(UNITS), k)
    per_request = unit_mean[owner] * rng.lognormal(0.0, 0.3, owner.size)
    y = np.bincount(owner, per_request, minlength=UNITS)
    squares = np.bincount(owner, per_request**2, minlength=UNITS)
    return k, y, squares, arm


def _aa_run(seed: int, binary: bool) -> tuple[bool, bool]:
    """One A/A experiment looked at LOOKS times as units arrive: did the always-valid
    p-value ever fall below alpha, per unit and per request?"""
    k, y, squares, arm = _population(np.random.default_rng(seed), binary)
    unit_p = request_p = 1.0
    for look in range(1, LOOKS + 1):
        n = UNITS * look // LOOKS
        c, t = ~arm[:n], arm[:n]
        per_unit = compare(
            Ratio.of(y[:n][c], k[:n][c], binary),
            Ratio.of(y[:n][t], k[:n][t], binary),
            ALPHA,
            0.1,
            unit_p,
        )
        assert per_unit is not None
        unit_p = per_unit[0].always_valid_p_value
        if binary:  # the request-level analysis the report used to do
            result = sequential.msprt_proportions(
                int(y[:n][c].sum()),
                int(k[:n][c].sum()),
                int(y[:n][t].sum()),
                int(k[:n][t].sum()),
                ALPHA,
                0.1,
                request_p,
            )
        else:
            mc = Moments(int(k[:n][c].sum()), float(y[:n][c].sum()), float(squares[:n][c].sum()))
            mt = Moments(int(k[:n][t].sum()), float(y[:n][t].sum()), float(squares[:n][t].sum()))
            result = sequential.msprt_means(
                mc.mean,
                mc.variance,
                mc.count,
                mt.mean,
                mt.variance,
                mt.count,
                ALPHA,
                0.1,
                request_p,
            )
        request_p = result.always_valid_p_value
    return unit_p < ALPHA, request_p < ALPHA


@pytest.mark.parametrize("binary", [False, True], ids=["latency_ms", "error_rate"])
def test_aa_per_unit_keeps_alpha_and_per_request_does_not(binary: bool) -> None:
    outcomes = np.array([_aa_run(seed, binary) for seed in range(RUNS)])
    per_unit, per_request = outcomes.mean(axis=0)
    print(
        f"\nA/A {'error_rate' if binary else 'latency_ms'}, {RUNS} runs x {LOOKS} looks: "
        f"false positives per unit {per_unit:.3f}, per request {per_request:.3f} "
        f"(bound {BOUND:.3f})"
    )
    assert per_unit <= BOUND
    assert per_request > BOUND


def test_one_request_per_unit_is_the_usual_variance_of_a_mean() -> None:
    rng = np.random.default_rng(3)
    values = rng.normal(10, 2, 500)
    ratio = Ratio.of(values, np.ones(500))
    assert ratio.value == pytest.approx(values.mean())
    assert ratio.variance == pytest.approx(values.var(ddof=1) / 500)


def test_delta_method_variance_matches_the_spread_of_repeated_experiments() -> None:
    """The delta-method variance of Σy/Σx against the variance of the ratio across many
    independent draws of the same clustered population."""
    rng = np.random.default_rng(4)
    estimates, predicted = [], []
    for _ in range(400):
        k = np.minimum(np.floor(rng.pareto(2.5, 400) + 1), 200)
        y = rng.binomial(k.astype(int), rng.beta(1, 9, 400)).astype(float)
        ratio = Ratio.of(y, k, binary=True)
        estimates.append(ratio.value)
        predicted.append(ratio.variance)
    assert np.mean(predicted) == pytest.approx(np.var(estimates), rel=0.15)


def test_an_error_free_ratio_has_a_finite_interval() -> None:
    none = Ratio.of(np.zeros(50), np.full(50, 3.0), binary=True)
    result = sequential.msprt_ratios(none, none)
    interval = result.confidence_sequence
    assert -1 < interval.low < 0 < interval.high < 1
