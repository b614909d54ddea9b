"""Triton's statistics of one version: what each answered request moves, exactly."""

from __future__ import annotations

import numpy as np
import pytest

from edgeserve.serving.scheduler import RunResult
from edgeserve.serving.statistics import Counter, Reading, VersionStats

OUTPUTS = {"label": np.zeros(3, dtype=np.int64)}


def _counted(seconds: float) -> Counter:
    counter = Counter()
    counter.add(seconds)
    return counter


def _read(seconds: float) -> Reading:
    """What a counter kept with others reads after one `add(seconds)`."""
    counter = _counted(seconds)
    return Reading(counter.count, counter.ns)


def test_a_computed_request_moves_each_stage_once_and_its_call_batch_entry() -> None:
    stats = VersionStats()
    result = RunResult(OUTPUTS, 0.0021, 0.0033, 8, input_s=0.0001, output_s=0.00007)
    stats.succeeded(0.0123, 0.0004, result, 3)
    assert stats.success == _counted(0.0123)
    assert stats.queue == _read(0.0021)
    assert stats.compute_input == _read(0.0004 + 0.0001)
    assert stats.compute_infer == _read(0.0033)
    assert stats.compute_output == _read(0.00007)
    assert (stats.inference_count, stats.execution_count) == (3, 1)
    assert stats.last_inference_ms > 0
    batch = stats.batches[8]
    assert batch.compute_input == _read(0.0001)
    assert batch.compute_infer == _read(0.0033)
    assert batch.compute_output == _read(0.00007)
    assert stats.fail == Counter()


@pytest.mark.parametrize(
    ("result", "computed"),
    [
        (RunResult(OUTPUTS, 0.001, 0.002, 8, executions=0), True),  # merged into another call
        (RunResult(OUTPUTS, 0.0, 0.0, 0, executions=0, cached=True), False),
    ],
)
def test_a_merged_request_has_no_batch_entry_and_a_cached_one_no_compute(
    result: RunResult, computed: bool
) -> None:
    stats = VersionStats()
    stats.succeeded(0.005, 0.0, result, 2)
    assert stats.success == _counted(0.005)
    assert stats.batches == {}
    assert stats.execution_count == 0
    assert stats.compute_infer.count == stats.queue.count == int(computed)
    assert stats.inference_count == (2 if computed else 0)


def test_output_time_after_the_request_moves_compute_output_ns_but_no_count() -> None:
    stats = VersionStats()
    result = RunResult(OUTPUTS, 0.001, 0.002, 1, output_s=0.00002)
    stats.succeeded(0.004, 0.0, result, 1)
    stats.output_took(0.00003)
    expected = _counted(0.00002)
    expected.add(0.00003, n=0)
    assert stats.compute_output == Reading(expected.count, expected.ns)
    assert stats.compute_output.count == stats.compute_infer.count == stats.queue.count == 1
