"""Guardrails as experimenters expect them (issue 20): non-inferiority margins before a
promotion, Benjamini-Hochberg beside Holm, and an SRM check that stays valid when it
runs at every decision interval. Seeded and deterministic."""

from __future__ import annotations

import math

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from edgeserve.experiments.decision import (
    MetricSpec,
    Moments,
    Policy,
    Proportion,
    VariantSummary,
    decide,
    policy_for,
)
from edgeserve.experiments.model import parse_definition
from edgeserve.experiments.stats import (
    benjamini_hochberg,
    sample_ratio_mismatch,
    sequential_sample_ratio_mismatch,
)


def _variant(name: str, correct: int, latency: Moments) -> VariantSummary:
    metrics = {"accuracy": Proportion(correct, 3000), "latency_ms": latency}
    return VariantSummary(name, 3000, 0, metrics=metrics)


def test_a_winner_waits_until_its_latency_is_shown_within_the_margin() -> None:
    rng = np.random.default_rng(2)
    fast, noisy = rng.normal(10, 1, 3000), rng.normal(10.0, 8, 3000)
    control = _variant("v1", 2700, Moments.of(fast))
    candidate = _variant("v2", 2850, Moments.of(noisy))
    guardrails = (MetricSpec("error_rate", "lower"), MetricSpec("latency_ms", "lower"))
    plain = decide([control, candidate], [50, 50], Policy(guardrails=guardrails))
    assert plain.action == "promote"
    strict = Policy(guardrails=guardrails, guardrail_margins={"latency_ms": 0.5})
    held = decide([control, candidate], [50, 50], strict)
    assert held.action == "continue"
    assert "waiting for guardrail latency_ms to be shown within its margin 0.5" in held.reason
    (latency,) = [t for t in held.tests if t.metric == "latency_ms"]
    assert latency.non_inferior is False
    loose = Policy(guardrails=guardrails, guardrail_margins={"latency_ms": 5.0})
    assert decide([control, candidate], [50, 50], loose).action == "promote"


def test_benjamini_hochberg_matches_statsmodels_and_is_a_definition_option() -> None:
    p = [0.01, 0.04, 0.03, 0.2, 0.001, 0.5]
    expected = multipletests(p, method="fdr_bh")[1]
    assert benjamini_hochberg(p) == pytest.approx(list(expected), abs=1e-12)
    exp = parse_definition(
        {
            "id": "e",
            "model": "m",
            "variants": [{"name": "a", "version": 1}, {"name": "b", "version": 2}],
            "correction": "bh",
            "guardrail_margins": {"latency_ms": 5.0},
        }
    )
    policy = policy_for(exp, 0.05, 0.1, 200)
    assert policy.correction == "bh" and policy.guardrail_margins == {"latency_ms": 5.0}


def test_srm_checked_at_every_look_keeps_its_error_rate_only_when_sequential() -> None:
    """Correct 50/50 assignment checked after every 100 units up to 5,000: the sequential
    check flags at most alpha + 2 SE of runs, chi-square peeked the same way far more."""
    alpha, runs = 0.05, 200
    bound = alpha + 2 * math.sqrt(alpha * (1 - alpha) / runs)
    flagged = np.zeros(2)
    for seed in range(runs):
        arms = np.random.default_rng(seed).random(5000) < 0.5
        seen = [False, False]
        for n in range(100, 5001, 100):
            counts = [int((~arms[:n]).sum()), int(arms[:n].sum())]
            seen[0] |= sequential_sample_ratio_mismatch(counts, [1, 1], alpha).mismatch
            seen[1] |= sample_ratio_mismatch(counts, [1, 1], alpha).mismatch
        flagged += seen
    sequential_rate, chi_square_rate = flagged / runs
    print(
        f"\nSRM peeked 50 times: sequential {sequential_rate:.3f}, chi-square {chi_square_rate:.3f}"
    )
    assert sequential_rate <= bound < chi_square_rate


def test_sequential_srm_still_catches_broken_assignment() -> None:
    assert sequential_sample_ratio_mismatch([10_400, 9_600], [1, 1]).mismatch
    assert not sequential_sample_ratio_mismatch([197, 203], [1, 1]).mismatch
    zero = sequential_sample_ratio_mismatch([50, 3], [1, 0])
    assert zero.mismatch and zero.p_value == 0.0
