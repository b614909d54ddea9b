"""Experiment statistics against independent references, and simulations that show why
the sequential test is the default for decisions made while watching."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import integrate, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportions_ztest

from edgeserve.experiments import sequential
from edgeserve.experiments.stats import (
    holm,
    sample_ratio_mismatch,
    sample_size_means,
    sample_size_proportions,
    two_proportion_ztest,
    welch_ttest,
)


@pytest.mark.parametrize(
    ("x_c", "n_c", "x_t", "n_t"),
    [(450, 1000, 480, 1000), (90, 1000, 95, 1000), (30, 50, 45, 60), (5, 400, 19, 380)],
)
def test_two_proportion_ztest_matches_statsmodels(x_c: int, n_c: int, x_t: int, n_t: int) -> None:
    ours = two_proportion_ztest(x_c, n_c, x_t, n_t)
    z, p = proportions_ztest([x_t, x_c], [n_t, n_c])
    assert ours.statistic == pytest.approx(z, rel=1e-9)
    assert ours.p_value == pytest.approx(p, rel=1e-9)
    diff = x_t / n_t - x_c / n_c
    se = math.sqrt((x_t / n_t) * (1 - x_t / n_t) / n_t + (x_c / n_c) * (1 - x_c / n_c) / n_c)
    assert ours.absolute_ci.low == pytest.approx(diff - stats.norm.ppf(0.975) * se)


def test_welch_ttest_matches_scipy() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(10, 2, 80), rng.normal(10.8, 3, 120)
    ours = welch_ttest(a.mean(), a.var(ddof=1), len(a), b.mean(), b.var(ddof=1), len(b))
    ref = stats.ttest_ind(b, a, equal_var=False)
    assert ours.statistic == pytest.approx(ref.statistic, rel=1e-9)
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-7)
    ci = ref.confidence_interval(0.95)
    assert (ours.absolute_ci.low, ours.absolute_ci.high) == pytest.approx(
        (ci.low, ci.high), rel=1e-6
    )


def test_sample_ratio_mismatch_matches_scipy_chisquare() -> None:
    check = sample_ratio_mismatch([5200, 4800], [0.5, 0.5])
    ref = stats.chisquare([5200, 4800], [5000, 5000])
    assert check.statistic == pytest.approx(ref.statistic)
    assert check.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    assert check.mismatch  # 52/48 at n=10,000 is flagged
    assert not sample_ratio_mismatch([52, 48], [0.5, 0.5]).mismatch  # not at n=100
    three = sample_ratio_mismatch([310, 330, 360], [1, 1, 1])
    assert three.p_value == pytest.approx(stats.chisquare([310, 330, 360]).pvalue, rel=1e-9)


def test_holm_matches_statsmodels() -> None:
    p = [0.01, 0.04, 0.03, 0.005, 0.2]
    assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))


def test_sample_size_for_five_points_at_ninety_percent() -> None:
    n = sample_size_proportions(0.90, 0.95, share_candidate=0.1)
    za, zb = stats.norm.ppf(0.975), stats.norm.ppf(0.8)
    pooled = 0.9 * 0.90 + 0.1 * 0.95
    null = math.sqrt(pooled * (1 - pooled) * (1 / 0.9 + 1 / 0.1))
    alt = math.sqrt(0.9 * 0.1 / 0.9 + 0.95 * 0.05 / 0.1)
    assert n == math.ceil((za * null + zb * alt) ** 2 / 0.05**2)  # 2,609 units in all
    # balanced and equal variances: the textbook 2 (za + zb)^2 p q / d^2 per arm, twice
    n_even = sample_size_proportions(0.5, 0.6)
    assert (
        abs(n_even - 2 * (za * math.sqrt(2 * 0.55 * 0.45) + zb * math.sqrt(0.49)) ** 2 / 0.01) < 1
    )


@pytest.mark.parametrize(("sd", "difference", "share"), [(1.0, 0.1, 0.1), (4.0, 0.5, 0.5)])
def test_sample_size_for_means_matches_statsmodels(
    sd: float, difference: float, share: float
) -> None:
    ratio = share / (1 - share)  # candidate units per control unit
    control = NormalIndPower().solve_power(difference / sd, alpha=0.05, power=0.8, ratio=ratio)
    assert sample_size_means(sd, difference, share_candidate=share) == math.ceil(
        control * (1 + ratio) - 1e-9
    )


def test_sample_size_for_proportions_gives_the_power_it_promises() -> None:
    """At the computed size a fixed-horizon z-test finds 0.90 -> 0.95 (10% traffic) in
    about 80% of seeded simulated experiments."""
    n = sample_size_proportions(0.90, 0.95, share_candidate=0.1)
    rng = np.random.default_rng(21)
    n_t = rng.binomial(n, 0.1, 4000)
    x_c, x_t = rng.binomial(n - n_t, 0.90), rng.binomial(n_t, 0.95)
    p_c, p_t = x_c / (n - n_t), x_t / n_t
    pooled = (x_c + x_t) / n
    z = (p_t - p_c) / np.sqrt(pooled * (1 - pooled) * (1 / (n - n_t) + 1 / n_t))
    power = float(np.mean(z > stats.norm.ppf(0.975)))
    assert 0.76 < power < 0.84, power


def test_relative_difference_interval_covers_the_true_lift() -> None:
    """Delta-method interval for (candidate - control) / control: about 95% coverage."""
    rng = np.random.default_rng(4)
    sims, covered = 2000, 0
    for _ in range(sims):
        a, b = rng.normal(10, 3, 400), rng.normal(11, 3, 400)
        r = welch_ttest(a.mean(), a.var(ddof=1), 400, b.mean(), b.var(ddof=1), 400)
        assert r.relative_ci is not None
        covered += r.relative_ci.low <= 0.1 <= r.relative_ci.high
    assert 0.93 < covered / sims < 0.97


def test_welch_from_summaries_matches_scipy_from_stats() -> None:
    ours = welch_ttest(5.0, 4.0, 30, 6.1, 9.0, 12)
    ref = stats.ttest_ind_from_stats(6.1, 3.0, 12, 5.0, 2.0, 30, equal_var=False)
    assert (ours.statistic, ours.p_value) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-7)


def test_mixture_likelihood_ratio_equals_the_integral_it_stands_for() -> None:
    """Worked example: the closed form against numerical integration of the mixture
    N(d; theta, v) / N(d; 0, v) averaged over theta ~ N(0, tau^2)."""
    for d, v, tau in [
        (0.03, 0.0004, 0.05),
        (-0.1, 0.002, 0.02),
        (0.0, 0.01, 0.1),
        (0.05, 0.0001, 0.03),
    ]:

        def integrand(theta: float, d: float = d, v: float = v, tau: float = tau) -> float:
            return (
                stats.norm.pdf(d, theta, math.sqrt(v))
                / stats.norm.pdf(d, 0, math.sqrt(v))
                * stats.norm.pdf(theta, 0, tau)
            )

        expected, _ = integrate.quad(integrand, -20 * tau, 20 * tau, limit=200)
        assert sequential.mixture_likelihood_ratio(d, v, tau) == pytest.approx(expected, rel=1e-6)


def test_confidence_sequence_is_where_the_ratio_stays_below_one_over_alpha() -> None:
    result = sequential.msprt(0.02, 0.0001, 0.03, alpha=0.05)
    for edge in (result.confidence_sequence.low, result.confidence_sequence.high):
        # the boundary: a difference of (d - edge) gives Lambda = 1/alpha
        assert sequential.mixture_likelihood_ratio(0.02 - edge, 0.0001, 0.03) == pytest.approx(
            20.0, rel=1e-6
        )


def _howard_halfwidth_and_p(
    difference: float, se: float, n: int, tuning_n: float, alpha: float
) -> tuple[float, float, float]:
    """The same test written the way GrowthBook's gbstats writes it (Waudby-Smith et al.
    2023, eq. 155; Howard et al. 2021 normal mixture), from the papers' formulas:
    rho^2 = (-2 ln a + ln(1 - 2 ln a)) / N*, s^2 = n se^2,
    half = s sqrt(2 (n rho^2 + 1) ln(sqrt(n rho^2 + 1) / a) / (n rho)^2),
    e = exp(rho^2 n d^2 / se^2 / (2 (n rho^2 + 1))) / sqrt(n rho^2 + 1), p = min(1, 1/e).
    Returns (half, p, rho)."""
    rho = math.sqrt((-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / tuning_n)
    s2 = se**2 * n
    k = n * rho**2 + 1
    half = math.sqrt(s2) * math.sqrt(2 * k * math.log(math.sqrt(k) / alpha) / (n * rho) ** 2)
    evalue = math.exp(rho**2 * (difference**2 * n / se**2) / (2 * k)) / math.sqrt(k)
    return half, min(1.0, 1 / evalue), rho


@pytest.mark.parametrize(
    ("difference", "se", "n"),
    [(0.02, 0.01, 4000), (0.5, 0.2, 800), (-0.004, 0.001, 100_000), (0.0, 0.05, 50)],
)
def test_sequential_matches_growthbooks_asymptotic_confidence_sequence(
    difference: float, se: float, n: int
) -> None:
    """Worked example against an independent parameterisation: the mixture SPRT with
    tau^2 = rho^2 n se^2 is GrowthBook's sequential test (tuning N* = 5000)."""
    half, p, rho = _howard_halfwidth_and_p(difference, se, n, 5000.0, 0.05)
    tau = rho * math.sqrt(n) * se
    ours = sequential.msprt(difference, se**2, tau, alpha=0.05)
    width = ours.confidence_sequence.high - ours.confidence_sequence.low
    assert width / 2 == pytest.approx(half, rel=1e-9)
    assert ours.always_valid_p_value == pytest.approx(p, rel=1e-9)


def test_sequential_worked_numbers() -> None:
    """Pinned by hand: d = 0.02, v = 1e-4, tau = 0.03, alpha = 0.05.
    Lambda = sqrt(1e-4 / 1e-3) exp(4e-4 * 9e-4 / (2e-4 * 1e-3)) = 0.316228 e^1.8 = 1.913067
    half = sqrt(1e-4 * 1e-3 / 9e-4 * (2 ln 20 + ln 10)) = 0.0303572"""
    r = sequential.msprt(0.02, 1e-4, 0.03, alpha=0.05)
    assert r.likelihood_ratio == pytest.approx(math.sqrt(0.1) * math.exp(1.8), rel=1e-12)
    assert r.likelihood_ratio == pytest.approx(1.913067, rel=1e-6)
    assert r.always_valid_p_value == pytest.approx(1 / 1.913067, rel=1e-6)
    half = math.sqrt(1e-4 * 1e-3 / 9e-4 * (2 * math.log(20) + math.log(10)))
    assert r.confidence_sequence.high - 0.02 == pytest.approx(half, rel=1e-12)
    assert half == pytest.approx(0.0303572, rel=1e-6)
    assert not r.significant


def _peeked_false_positive_rates(sims: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    looks = np.arange(100, 5001, 100)
    seq_hits = fixed_hits = 0
    for _ in range(sims):
        c = np.cumsum(rng.random(5000) < 0.9)
        t = np.cumsum(rng.random(5000) < 0.9)
        p_running = 1.0
        seq_rejected = fixed_rejected = False
        for n in looks:
            result = sequential.msprt_proportions(
                int(c[n - 1]), n, int(t[n - 1]), n, previous_p=p_running
            )
            p_running = result.always_valid_p_value
            seq_rejected |= result.significant
            fixed_rejected |= (
                two_proportion_ztest(int(c[n - 1]), n, int(t[n - 1]), n).p_value < 0.05
            )
        seq_hits += seq_rejected
        fixed_hits += fixed_rejected
    return seq_hits / sims, fixed_hits / sims


@pytest.mark.slow
def test_aa_simulation_sequential_holds_alpha_where_peeked_fixed_horizon_does_not() -> None:
    sequential_fpr, fixed_fpr = _peeked_false_positive_rates(sims=1000, seed=11)
    print(
        f"\nA/A, 1000 experiments, 50 looks each: sequential FPR={sequential_fpr:.3f}, "
        f"peeked fixed-horizon FPR={fixed_fpr:.3f} (alpha=0.05)"
    )
    assert sequential_fpr <= 0.05
    assert fixed_fpr > 0.10


@pytest.mark.slow
def test_power_simulation_detects_five_points_at_ten_percent_traffic() -> None:
    """0.90 -> 0.95 accuracy, 10% of units to the candidate, the sequential test looked at
    every 250 labelled units: how many units until it calls the candidate better."""
    rng = np.random.default_rng(3)
    runs, units = 200, 20_000
    needed, to_candidate_needed = [], []
    for _ in range(runs):
        to_candidate = rng.random(units) < 0.10
        correct = np.where(to_candidate, rng.random(units) < 0.95, rng.random(units) < 0.90)
        n_t = np.cumsum(to_candidate)
        n_c = np.arange(1, units + 1) - n_t
        x_t = np.cumsum(correct & to_candidate)
        x_c = np.cumsum(correct & ~to_candidate)
        p_running = 1.0
        for n in range(250, units + 1, 250):
            i = n - 1
            result = sequential.msprt_proportions(
                int(x_c[i]), int(n_c[i]), int(x_t[i]), int(n_t[i]), previous_p=p_running
            )
            p_running = result.always_valid_p_value
            if result.significant:
                assert result.difference > 0  # never the wrong way round
                needed.append(n)
                to_candidate_needed.append(int(n_t[i]))
                break
    detected = len(needed) / runs
    fixed = sample_size_proportions(0.90, 0.95, share_candidate=0.1)
    print(
        f"\npower: 0.90 -> 0.95 at 10% traffic detected in {detected:.1%} of {runs} runs "
        f"within {units} units; units needed median {int(np.median(needed))}, "
        f"p80 {int(np.percentile(needed, 80))}, p90 {int(np.percentile(needed, 90))} "
        f"(candidate median {int(np.median(to_candidate_needed))}); "
        f"fixed-horizon 80% power needs {fixed}"
    )
    assert detected >= 0.95


@pytest.mark.parametrize(
    "result",
    [
        two_proportion_ztest(0, 100, 0, 100),
        welch_ttest(0.0, 0.0, 10, 1.0, 0.0, 10),
        sample_ratio_mismatch([10, 0], [1, 0]),
        sequential.msprt(0.0, 0.0, 0.1),
    ],
    ids=["z", "welch", "srm", "msprt"],
)
def test_every_number_is_labelled_and_serialises_to_strict_json(result: object) -> None:
    fields = {f.name for f in dataclasses.fields(result)}  # type: ignore[arg-type]
    assert set(result.FIELDS) == fields  # type: ignore[attr-defined]
    assert all(result.FIELDS.values())  # type: ignore[attr-defined]
    doc = json.loads(json.dumps(result.as_dict(), allow_nan=False))  # type: ignore[attr-defined]
    assert set(doc) == fields
