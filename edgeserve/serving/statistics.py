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


@dataclass
class Counter:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, n: int = 1) -> None:
        self.count += n
        self.ns += int(seconds * 1e9)


@dataclass
class BatchStats:
    """One batch size's runtime calls: Triton's `batch_stats` entry."""

    compute_input: Counter = field(default_factory=Counter)
    compute_infer: Counter = field(default_factory=Counter)
    compute_output: Counter = field(default_factory=Counter)


@dataclass
class VersionStats:
    """Per-version statistics in the shape Triton's statistics extension reports."""

    success: Counter = field(default_factory=Counter)
    fail: Counter = field(default_factory=Counter)
    queue: Counter = field(default_factory=Counter)
    # The three compute counters move together (perf_analyzer refuses counts that differ):
    # one count per computed request; cache hits are in none of them.
    compute_input: Counter = field(default_factory=Counter)
    compute_infer: Counter = field(default_factory=Counter)
    compute_output: Counter = field(default_factory=Counter)
    inference_count: int = 0  # rows computed (cache hits excluded, as in Triton)
    execution_count: int = 0  # runtime calls
    last_inference_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)  # runtime calls by batch size
    shed: int = 0  # refused with 429 before the endpoint ran (http/shedding.py)

    def succeeded(self, total_s: float, input_s: float, result: RunResult, rows: int) -> None:
        """One request the scheduler answered, counted as Triton does: a success of
        `total_s`; unless the cache answered it, one count of each compute stage (the
        caller's `input_s`, decoding, is compute_input's too), its `rows`, and its
        runtime call's batch entry when the call is charged to it.

        The counters are moved here, not with `Counter.add`: the same arithmetic, in one
        call per request instead of up to eight (each request pays them on the event loop).
        """
        counter = self.success
        counter.count += 1
        counter.ns += int(total_s * 1e9)
        self.last_inference_ms = int(time.time() * 1000)
        if result.cached:
            return
        infer_ns = int(result.compute_s * 1e9)  # the batch entry's too
        output_ns = int(result.output_s * 1e9)
        counter = self.queue
        counter.count += 1
        counter.ns += int(result.queue_s * 1e9)
        counter = self.compute_input
        counter.count += 1
        counter.ns += int((input_s + result.input_s) * 1e9)
        counter = self.compute_infer
        counter.count += 1
        counter.ns += infer_ns
        counter = self.compute_output
        counter.count += 1
        counter.ns += output_ns
        self.inference_count += rows
        executions = result.executions  # 0 when merged into another request's call
        if executions:
            self.execution_count += executions
            batch = self.batches.get(result.batch_size)
            if batch is None:
                batch = self.batches[result.batch_size] = BatchStats()
            counter = batch.compute_input
            counter.count += 1
            counter.ns += int(result.input_s * 1e9)
            counter = batch.compute_infer
            counter.count += 1
            counter.ns += infer_ns
            counter = batch.compute_output
            counter.count += 1
            counter.ns += output_ns
