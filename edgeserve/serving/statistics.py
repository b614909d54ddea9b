"""Per-version statistics in the shape of Triton's statistics extension.

What perf_analyzer reads: it refuses a model whose compute_input, compute_infer and
compute_output counts differ, so the three move together, one count per computed
request (`ModelVersion.infer`); documents.py turns them into the protocol's document.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
