"""Feeding the health watch from real traffic: a thin scheduler wrapper per probation.

The wrapper sits between `ModelVersion.infer` and the version's scheduler only while
the version is on probation, so a confirmed version pays nothing. It counts outcomes
that are the model's fault (a runtime failure, an unexpected exception); load
shedding, deadlines and bad inputs are the client's or the box's, not the model's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeserve.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded
from edgeserve.serving.registry import ModelVersion
from edgeserve.serving.scheduler import RunResult, Scheduler
from updater import HealthWatch, Manifest

NOT_THE_MODELS_FAULT = (Overloaded, DeadlineExceeded, InvalidInput, ModelNotReady)

Observe = Callable[[bool, float], None]


class ObservedScheduler:
    """Delegates to `inner`; reports each request's outcome and latency to `observe`."""

    def __init__(self, inner: Scheduler, observe: Observe) -> None:
        self.inner = inner
        self._observe = observe

    async def submit(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, deadline: float | None
    ) -> RunResult:
        started = time.perf_counter()
        try:
            result = await self.inner.submit(inputs, outputs, deadline)
        except NOT_THE_MODELS_FAULT:
            raise
        except Exception:
            self._observe(False, (time.perf_counter() - started) * 1000)
            raise
        self._observe(True, (time.perf_counter() - started) * 1000)
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
            "p99_ms": w.p99_ms(),
            "window_left_s": max(0.0, w.policy.watch_window_s - (now_s - w.started_s)),
            "probe_failure": w.probe_failure,
        }
