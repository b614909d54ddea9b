"""Per-version statistics in the shape of Triton's statistics extension.

What perf_analyzer reads: it refuses a model whose compute_input, compute_infer and
compute_output counts differ, so the three move together, one count per computed
request (`ModelVersion.infer`); documents.py turns them into the protocol's document.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeserve.serving.scheduler import RunResult


@dataclass(frozen=True)
class Reading:
    """A counter read from counts kept together (VersionStats.queue, ...): a value with
    no `add`, so that a stray update fails rather than changing a copy. A frozen
    dataclass, not a NamedTuple: a field named `count` would shadow `tuple.count`."""

    count: int
    ns: int


class _SharedCount:
    """An attribute read as a `Reading` of one ns sum and the count it shares with
    others (`BatchStats.compute_input` is `Reading(calls, compute_input_ns)`)."""

    def __init__(self, count: str, ns: str) -> None:
        self._count = count
        self._ns = ns

    def __get__(self, stats: object, owner: type | None = None) -> Reading:
        return Reading(getattr(stats, self._count), getattr(stats, self._ns))


@dataclass
class Counter:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)


@dataclass
class BatchStats:
    """One batch size's runtime calls: Triton's `batch_stats` entry. Its three counters
    share one count (`calls`), so a call moves one count and three sums of ns."""

    calls: int = 0  # the count of compute_input, compute_infer and compute_output
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0

    compute_input = _SharedCount("calls", "compute_input_ns")
    compute_infer = _SharedCount("calls", "compute_infer_ns")
    compute_output = _SharedCount("calls", "compute_output_ns")


@dataclass
class VersionStats:
    """Per-version statistics in the shape Triton's statistics extension reports.

    The queue and the three compute counters move together (perf_analyzer refuses
    compute counts that differ): one count per computed request, `computed`, which the
    four share; cache hits are in none of them. They are read as `Reading`s (values,
    with no `add`): an answered request moves one count and four sums, not four of each.
    """

    success: Counter = field(default_factory=Counter)
    fail: Counter = field(default_factory=Counter)
    computed: int = 0  # the count of queue, compute_input, compute_infer and compute_output
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    inference_count: int = 0  # rows computed (cache hits excluded, as in Triton)
    execution_count: int = 0  # runtime calls
    last_inference_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)  # runtime calls by batch size
    shed: int = 0  # refused with 429 before the endpoint ran (http/shedding.py)

    queue = _SharedCount("computed", "queue_ns")
    compute_input = _SharedCount("computed", "compute_input_ns")
    compute_infer = _SharedCount("computed", "compute_infer_ns")
    compute_output = _SharedCount("computed", "compute_output_ns")

    def succeeded(self, total_s: float, input_s: float, result: RunResult, rows: int) -> None:
        """One request the scheduler answered, counted as Triton does: a success of
        `total_s`; unless the cache answered it, one count of each compute stage (the
        caller's `input_s`, decoding, is compute_input's too), its `rows`, and its
        runtime call's batch entry when the call is charged to it.

        The same arithmetic as `Counter.add` (each time converted to whole ns, then
        summed), written out: each request pays it on the event loop.
        """
        counter = self.success
        counter.count += 1
        counter.ns += int(total_s * 1e9)
        self.last_inference_ms = int(time.time() * 1000)
        if result.cached:
            return
        infer_ns = int(result.compute_s * 1e9)  # the batch entry's too
        output_ns = int(result.output_s * 1e9)
        self.computed += 1
        self.queue_ns += int(result.queue_s * 1e9)
        self.compute_input_ns += int((input_s + result.input_s) * 1e9)
        self.compute_infer_ns += infer_ns
        self.compute_output_ns += output_ns
        self.inference_count += rows
        executions = result.executions  # 0 when merged into another request's call
        if executions:
            self.execution_count += executions
            batch = self.batches.get(result.batch_size)
            if batch is None:
                batch = self.batches[result.batch_size] = BatchStats()
            batch.calls += 1
            batch.compute_input_ns += int(result.input_s * 1e9)
            batch.compute_infer_ns += infer_ns
            batch.compute_output_ns += output_ns

    def output_took(self, seconds: float) -> None:
        """Taking a computed request's answer apart after `succeeded` (its prediction,
        its classes): compute_output's time, its count already moved."""
        self.compute_output_ns += int(seconds * 1e9)
