"""Scheduling of runtime calls for one model version, with admission control.

`DirectScheduler` runs each request as its own runtime call on the shared executor;
the queue is bounded: past `max_queue_size` waiting or running requests, a new one is
refused at once with `Overloaded` (429 + Retry-After) instead of timing out later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgeserve.errors import DeadlineExceeded, Overloaded

RunFn = Callable[[Mapping[str, np.ndarray], Sequence[str] | None], dict[str, np.ndarray]]


@dataclass(slots=True)
class RunResult:
    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    batch_size: int  # rows in the runtime call that computed this request


class Scheduler(Protocol):
    """Runs requests for one model version; the registry holds one per version."""

    @property
    def depth(self) -> int: ...  # requests waiting or running

    async def submit(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, deadline: float | None
    ) -> RunResult: ...

    async def close(self) -> None: ...


class DirectScheduler:
    """One runtime call per request on the executor; bounded in-flight count."""

    def __init__(self, run: RunFn, executor: Executor, max_queue_size: int) -> None:
        self._run = run
        self._executor = executor
        self._max = max_queue_size
        self._depth = 0

    @property
    def depth(self) -> int:
        return self._depth

    async def submit(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, deadline: float | None
    ) -> RunResult:
        if self._depth >= self._max:
            raise Overloaded("the model's queue is full; retry later", headers={"Retry-After": "1"})
        self._depth += 1
        enqueued = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(
                self._executor, self._timed, inputs, outputs, enqueued, deadline
            )
        finally:
            self._depth -= 1
        return result

    def _timed(
        self,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str] | None,
        enqueued: float,
        deadline: float | None,
    ) -> RunResult:
        started = time.perf_counter()
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("the request's deadline passed before it could run")
        result = self._run(inputs, outputs)
        done = time.perf_counter()
        rows = next(iter(inputs.values())).shape[0] if inputs else 1
        return RunResult(result, started - enqueued, done - started, rows)

    async def close(self) -> None:
        """Nothing is queued outside the executor; in-flight calls finish on their own."""
