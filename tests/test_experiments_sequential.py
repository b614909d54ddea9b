"""The mixture SPRT on continuous metrics: valid when peeked, and its confidence
sequence covers the truth at every look at once (seeded simulations)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeserve.experiments import sequential
from edgeserve.experiments.stats import welch_ttest

LOOKS = np.arange(50, 2001, 50)  # per arm: 40 looks


def _running_sums(rng: np.random.Generator, sims: int, shift: float) -> tuple[np.ndarray, ...]:
    """Latency-like skewed values (lognormal, ms), cumulative count/sum/sum of squares."""
    c = rng.lognormal(3.0, 0.5, (sims, LOOKS[-1]))
    t = rng.lognormal(3.0, 0.5, (sims, LOOKS[-1])) + shift
    return c.cumsum(1), (c * c).cumsum(1), t.cumsum(1), (t * t).cumsum(1)


def _moments(total: float, squares: float, n: int) -> tuple[float, float]:
    mean = total / n
    return mean, (squares - total * total / n) / (n - 1)


@pytest.mark.slow
def test_aa_on_a_skewed_continuous_metric_peeked_40_times() -> None:
    rng = np.random.default_rng(17)
    sims = 500
    sc, qc, st, qt = _running_sums(rng, sims, 0.0)
    seq_hits = fixed_hits = 0
    for s in range(sims):
        p_running, seq, fixed = 1.0, False, False
        for n in LOOKS:
            mc, vc = _moments(sc[s, n - 1], qc[s, n - 1], n)
            mt, vt = _moments(st[s, n - 1], qt[s, n - 1], n)
            r = sequential.msprt_means(mc, vc, n, mt, vt, n, previous_p=p_running)
            p_running = r.always_valid_p_value
            seq |= r.significant
            fixed |= welch_ttest(mc, vc, n, mt, vt, n).p_value < 0.05
        seq_hits += seq
        fixed_hits += fixed
    print(
        f"\nA/A lognormal latency, {sims} runs x {len(LOOKS)} looks: sequential FPR="
        f"{seq_hits / sims:.3f}, peeked Welch FPR={fixed_hits / sims:.3f}"
    )
    assert seq_hits / sims <= 0.05
    assert fixed_hits / sims > 0.10


@pytest.mark.slow
def test_confidence_sequence_covers_the_true_difference_at_every_look_at_once() -> None:
    rng = np.random.default_rng(23)
    sims, shift = 400, 1.5  # candidate 1.5 ms slower
    sc, qc, st, qt = _running_sums(rng, sims, shift)
    missed = 0
    for s in range(sims):
        for n in LOOKS:
            mc, vc = _moments(sc[s, n - 1], qc[s, n - 1], n)
            mt, vt = _moments(st[s, n - 1], qt[s, n - 1], n)
            cs = sequential.msprt_means(mc, vc, n, mt, vt, n).confidence_sequence
            if not cs.low <= shift <= cs.high:
                missed += 1
                break
    print(f"\nconfidence sequence missed the truth at some look in {missed}/{sims} runs")
    assert missed / sims <= 0.05
