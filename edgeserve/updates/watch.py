"""Feeding the health watch from real traffic: a thin scheduler wrapper per probation.

The wrapper sits between `ModelVersion.infer` and the version's scheduler only while
the version is on probation, so a confirmed version pays nothing. It counts outcomes
that are the model's fault (a runtime failure, an unexpected exception); load
shedding, deadlines and bad inputs are the client's or the box's, not the model's.
Speed is reported as compute time per row of the runtime call (queueing is the box's),
with the request's rows and its caller, so that the watch judges comparable work.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeserve.auth.principal import CALLER
from edgeserve.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded
from edgeserve.serving.registry import ModelVersion
from edgeserve.serving.scheduler import RunResult, Scheduler
from updater import HealthWatch, Manifest

NOT_THE_MODELS_FAULT = (Overloaded, DeadlineExceeded, InvalidInput, ModelNotReady)

Observe = Callable[[bool, float, int, str], None]


def _rows(inputs: dict[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def baseline_row_ms(model: ModelVersion | None, min_rows: int = 20) -> float | None:
    """The mean compute time per row of a version's runtime calls so far (the one being
    replaced), or None when it computed too little to say."""
    if model is None:
        return None
    batches = model.stats.batches  # per batch size: Triton's batch_stats counters
    rows = sum(size * stats.compute_infer.count for size, stats in batches.items())
    if rows < min_rows:
        return None
    return sum(stats.compute_infer.ns for stats in batches.values()) / rows / 1e6


class ObservedScheduler:
    """Delegates to `inner`; reports each request's outcome and latency to `observe`."""

    def __init__(self, inner: Scheduler, observe: Observe) -> None:
        self.inner = inner
        self._observe = observe

    async def submit(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, deadline: float | None
    ) -> RunResult:
        rows = _rows(inputs)
        caller = CALLER.get()
        started = time.perf_counter()
        try:
            result = await self.inner.submit(inputs, outputs, deadline)
        except NOT_THE_MODELS_FAULT:
            raise
        except Exception:
            self._observe(False, (time.perf_counter() - started) * 1000, rows, caller)
            raise
        row_ms = result.compute_s * 1000 / max(1, result.batch_size)
        self._observe(True, row_ms, rows, caller)
        return result

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:  # depth, full, cache_stats, ...
        return getattr(self.inner, name)


@dataclass
class Probation:
    """One version under watch: its health, its samples (the live probe), its wrapper."""

    version: int
    manifest: Manifest
    watch: HealthWatch
    model: ModelVersion
    next_probe_s: float
    probing: bool = field(default=False)

    def attach(self) -> None:
        if not isinstance(self.model.scheduler, ObservedScheduler):
            self.model.scheduler = ObservedScheduler(self.model.scheduler, self.watch.observe)

    def detach(self) -> None:
        scheduler = self.model.scheduler
        if isinstance(scheduler, ObservedScheduler):
            self.model.scheduler = scheduler.inner

    def summary(self, now_s: float) -> dict[str, Any]:
        w = self.watch
        return {
            "version": self.version,
            "requests": w.requests,
            "errors": w.errors,
            "p99_ms": w.p99_ms(),  # compute per row
            "baseline_row_ms": w.baseline_row_ms,
            "window_left_s": max(0.0, w.policy.watch_window_s - (now_s - w.started_s)),
            "probe_failure": w.probe_failure,
        }
