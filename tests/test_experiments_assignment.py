"""Assignment: a unit keeps its variant, and weight changes move only the units that must."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from scipy import stats

from edgeserve.experiments.assignment import (
    assign,
    bucket_ranges,
    choose_variant,
    in_rollout,
    unit_position,
    variants_at,
)
from edgeserve.experiments.decision import RolloutPlan

UNITS = [f"user-{i}" for i in range(20_000)]


def test_position_is_the_first_eight_bytes_of_sha256_over_two_to_the_64() -> None:
    digest = hashlib.sha256(b"exp-1:user-42").digest()
    assert unit_position("exp-1", "user-42") == int.from_bytes(digest[:8], "big") / 2**64


def test_positions_are_uniform_and_independent_between_salts() -> None:
    a = np.array([unit_position("exp-a", u) for u in UNITS])
    b = np.array([unit_position("exp-b", u) for u in UNITS])
    assert stats.kstest(a, "uniform").pvalue > 0.001
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.03  # one experiment's buckets say nothing of another's


def test_assignment_is_sticky_and_moves_only_what_must_move() -> None:
    before = [choose_variant("exp-1", u, [90, 10]) for u in UNITS]
    assert before == [choose_variant("exp-1", u, [90, 10]) for u in UNITS]  # sticky
    after = [choose_variant("exp-1", u, [80, 20]) for u in UNITS]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(m == (0, 1) for m in moved)  # only control -> candidate
    assert abs(len(moved) / len(UNITS) - 0.10) < 0.01  # exactly the 10% that must move
    assert abs(sum(after) / len(UNITS) - 0.20) < 0.01


def test_staged_rollout_only_ever_adds_units_to_the_candidate() -> None:
    plan = RolloutPlan((5, 25, 50))
    positions = np.array([unit_position("exp-2", u) for u in UNITS])
    previous = np.zeros(len(UNITS), dtype=int)
    for stage, percent in enumerate(plan.stages_percent):
        now = variants_at(positions, plan.weights(stage))
        assert not np.any((previous == 1) & (now == 0))  # nobody leaves the candidate
        assert abs(now.mean() - percent / 100) < 0.01
        previous = now


def test_vectorised_assignment_agrees_with_one_at_a_time() -> None:
    weights = [50, 30, 20]
    positions = np.array([unit_position("exp-3", u) for u in UNITS[:2000]])
    one_by_one = [choose_variant("exp-3", u, weights) for u in UNITS[:2000]]
    assert variants_at(positions, weights).tolist() == one_by_one
    assert variants_at(np.array([0.0, 0.5, 0.8, 0.999999]), weights).tolist() == [0, 1, 2, 2]


def test_shadow_mode_serves_the_control_and_copies_every_unit_to_the_candidate() -> None:
    for unit in UNITS[:200]:
        shadow = assign("exp-4", unit, [50, 50], mode="shadow")
        assert (shadow.serve, shadow.shadow) == (0, 1)
        split = assign("exp-4", unit, [50, 50])
        assert split.shadow is None
        assert split.serve == choose_variant("exp-4", unit, [50, 50])


def test_a_flag_that_holds_a_unit_back_keeps_it_on_the_control_without_a_copy() -> None:
    for mode in ("split", "shadow"):
        held = assign("exp-5", "user-1", [0, 100], mode=mode, candidates_allowed=False)
        assert (held.serve, held.shadow) == (0, None)


def test_rollout_percent_grows_monotonically() -> None:
    at = {p: {u for u in UNITS if in_rollout("flag:x", u, p)} for p in (0, 10, 20, 100)}
    assert at[0] == set() and at[100] == set(UNITS)
    assert at[10] <= at[20]
    assert abs(len(at[10]) / len(UNITS) - 0.10) < 0.01


def test_bucket_ranges_and_positions() -> None:
    assert bucket_ranges([1, 1, 2]) == [(0.0, 0.25), (0.25, 0.5), (0.5, 1.0)]
    assert 0 <= unit_position("s", "u") < 1
    assert unit_position("s", "u") != unit_position("t", "u")
    for bad in ([0, 0], [1, -1]):
        with pytest.raises(ValueError):
            bucket_ranges(bad)
