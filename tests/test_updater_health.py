"""The health watch verdicts and the validation-sample checks (both pure)."""

from __future__ import annotations

import numpy as np
import pytest

from updater import (
    HealthPolicy,
    HealthWatch,
    SampleMismatch,
    SampleTensor,
    ValidationSample,
    check_outputs,
    sample_inputs,
)

POLICY = HealthPolicy(watch_window_s=60, min_requests=20, max_error_rate=0.05, max_p99_ms=50)


def watch_with(ok: int, failed: int = 0, latency_ms: float = 5.0) -> HealthWatch:
    watch = HealthWatch(POLICY, started_s=1000.0)
    for _ in range(ok):
        watch.observe(True, latency_ms)
    for _ in range(failed):
        watch.observe(False, latency_ms)
    return watch


def test_healthy_version_is_confirmed_only_when_the_window_ends() -> None:
    watch = watch_with(100)
    assert watch.verdict(1030.0).action == "wait"
    verdict = watch.verdict(1060.0)
    assert verdict.action == "confirm" and "100 requests, 0 errors" in verdict.reason


def test_error_rate_breach_rolls_back_inside_the_window() -> None:
    verdict = watch_with(18, failed=2).verdict(1001.0)
    assert verdict.action == "rollback"
    assert verdict.reason == "error rate 10.0% over 5.0% (2 of 20 requests)"


def test_a_single_early_error_is_not_judged_before_min_requests() -> None:
    assert watch_with(3, failed=1).verdict(1001.0).action == "wait"
    assert watch_with(3, failed=1).verdict(1060.0).action == "rollback"  # judged at the end


def test_slow_version_rolls_back_on_p99() -> None:
    watch = HealthWatch(POLICY, started_s=1000.0)
    for caller in ("a", "b", "c"):  # slow for every caller, not for one
        for _ in range(30):
            watch.observe(True, 5.0, subject=caller)
        watch.observe(True, 400.0, subject=caller)
    verdict = watch.verdict(1002.0)
    assert verdict.action == "rollback"
    assert verdict.reason.startswith("p99 latency 400.00 ms per row"), verdict.reason


def test_one_caller_cannot_roll_a_version_back_on_speed() -> None:
    """Issue 18: one big request among 49 small ones from one caller crossed the p99."""
    watch = HealthWatch(POLICY, started_s=1000.0)
    for _ in range(49):
        watch.observe(True, 2.0, rows=1, subject="mallory")
    watch.observe(True, 3000.0, rows=15, subject="mallory")  # 15 x 1 MiB BYTES
    assert watch.verdict(1002.0).action == "wait"
    assert watch.verdict(2000.0).action == "confirm"  # the window ends healthy


def test_batch_size_outliers_are_not_judged_on_speed() -> None:
    watch = HealthWatch(POLICY, started_s=1000.0)
    for caller in ("a", "b", "c"):
        for _ in range(20):
            watch.observe(True, 2.0, rows=1, subject=caller)
    for _ in range(3):  # slow per row, but 64 rows where the median is 1: not comparable
        watch.observe(True, 900.0, rows=64, subject="a")
    assert watch.verdict(2000.0).action == "confirm"


def test_a_caller_has_one_vote() -> None:
    watch = HealthWatch(POLICY, started_s=1000.0)
    for caller in ("a", "b", "c"):
        for _ in range(20):
            watch.observe(True, 2.0, subject=caller)
    for _ in range(500):  # a flood of slow single-row requests from one of three callers
        watch.observe(True, 900.0, subject="c")
    assert watch.verdict(2000.0).action == "confirm"


def test_per_row_compute_is_judged_against_the_previous_versions() -> None:
    slow = HealthWatch(POLICY, started_s=1000.0, baseline_row_ms=1.0)
    same = HealthWatch(POLICY, started_s=1000.0, baseline_row_ms=1.0)
    for caller in ("a", "b", "c"):
        for _ in range(20):
            slow.observe(True, 4.0, subject=caller)  # 4x the previous version, under 50 ms
            same.observe(True, 1.2, subject=caller)
    verdict = slow.verdict(1002.0)
    assert verdict.action == "rollback" and "4.0x the previous version's" in verdict.reason
    assert same.verdict(2000.0).action == "confirm"


def test_failed_probe_rolls_back_at_once() -> None:
    watch = watch_with(0)
    watch.probe_failed("sample 0: output y differs by 3")
    assert (
        watch.verdict(1000.0).reason == "validation probe failed: sample 0: output y differs by 3"
    )


def test_latency_memory_is_bounded() -> None:
    watch = HealthWatch(POLICY, 0.0, max_latencies=100)
    for i in range(10_000):
        watch.observe(True, float(i % 100))
    assert len(watch._latencies) == 100 and watch.requests == 10_000


SAMPLE = ValidationSample(
    inputs={
        "x": SampleTensor("FP32", (1, 2), (1.0, 2.0)),
        "s": SampleTensor("BYTES", (1,), ("a",)),
    },
    expected={"y": (2.0, 4.0)},
    tolerance=0.01,
)


def test_sample_inputs_take_their_v2_type_and_shape() -> None:
    arrays = sample_inputs(SAMPLE)
    assert arrays["x"].dtype == np.float32 and arrays["x"].shape == (1, 2)
    assert arrays["s"].tolist() == [b"a"]


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({}, "output y is missing"),
        ({"y": np.array([2.0])}, "has 1 values, expected 2"),
        ({"y": np.array([2.0, 4.5])}, "differs by 0.5"),
        ({"y": np.array([2.0, np.nan])}, "differs by nan"),
    ],
)
def test_outputs_off_the_sample_are_refused(outputs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(SampleMismatch, match=message):
        check_outputs(SAMPLE, outputs)


def test_outputs_within_tolerance_pass() -> None:
    check_outputs(SAMPLE, {"y": np.array([[2.005, 3.995]], dtype=np.float32)})
