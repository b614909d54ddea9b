"""CUPED (issue 20): on simulated units whose KPI correlates 0.7 with their pre-period,
the variance shrinks to about 1 - rho^2 of itself (a reduction of rho^2), and an A/A
test looked at repeatedly keeps its false-positive rate. Seeded and deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeserve.experiments.cuped import cuped
from edgeserve.experiments.decision import Moments, compare

RHO = 0.7
ALPHA = 0.05
RUNS = 200
LOOKS = 10
BOUND = ALPHA + 2 * math.sqrt(ALPHA * (1 - ALPHA) / RUNS)


def _units(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(pre, post) per unit: a KPI of mean 50, SD 10, correlation RHO with its pre-period."""
    pre = rng.normal(0, 1, n)
    post = RHO * pre + math.sqrt(1 - RHO**2) * rng.normal(0, 1, n)
    return 50 + 10 * pre, 50 + 10 * post


def test_variance_shrinks_to_one_minus_rho_squared() -> None:
    rng = np.random.default_rng(11)
    reductions, factors = [], []
    for _ in range(20):
        pre, post = _units(rng, 4000)
        arm = rng.random(4000) < 0.5
        result = cuped([post[~arm], post[arm]], [pre[~arm], pre[arm]])
        assert result is not None
        factor = np.var(result.adjusted[1], ddof=1) / np.var(post[arm], ddof=1)
        assert 1 - factor == pytest.approx(result.variance_reduction, abs=0.05)
        reductions.append(result.variance_reduction)
        factors.append(factor)
    # 20 x 4000 units: the standard error of each mean is well under 0.01
    print(
        f"\nCUPED at rho={RHO}: variance x{np.mean(factors):.3f}, "
        f"reduction {np.mean(reductions):.3f}"
    )
    assert np.mean(factors) == pytest.approx(1 - RHO**2, abs=0.02)
    assert np.mean(reductions) == pytest.approx(RHO**2, abs=0.02)


def test_aa_with_cuped_keeps_its_false_positive_rate() -> None:
    false_positives = 0
    for seed in range(RUNS):
        rng = np.random.default_rng(seed)
        pre, post = _units(rng, 1000)
        arm = rng.random(1000) < 0.5
        p = 1.0
        for look in range(1, LOOKS + 1):
            n = 1000 * look // LOOKS
            c, t = ~arm[:n], arm[:n]
            result = cuped([post[:n][c], post[:n][t]], [pre[:n][c], pre[:n][t]])
            assert result is not None
            tested = compare(
                Moments.of(result.adjusted[0]), Moments.of(result.adjusted[1]), ALPHA, 0.1, p
            )
            assert tested is not None
            p = tested[0].always_valid_p_value
        false_positives += p < ALPHA
    print(f"\nA/A with CUPED, {RUNS} runs x {LOOKS} looks: {false_positives / RUNS:.3f}")
    assert false_positives / RUNS <= BOUND


def test_no_pre_period_means_no_adjustment() -> None:
    assert cuped([np.arange(10.0), np.arange(10.0)], [np.zeros(10), np.zeros(10)]) is None
