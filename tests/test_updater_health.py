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
    watch = watch_with(95)
    for _ in range(5):
        watch.observe(True, 400.0)
    verdict = watch.verdict(1002.0)
    assert verdict.action == "rollback" and verdict.reason.startswith("p99 latency 400.0 ms")


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
