"""What every scheduler of runtime calls shares: the result of one request's run, the
`Scheduler` protocol the registry holds per model version, request deadlines, and
`DirectScheduler`, one runtime call per request for models without a batch dimension.
The dynamic batcher is in edgeserve/serving/batcher.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgeserve.errors import DeadlineExceeded, InvalidInput, Overloaded

RunFn = Callable[[Mapping[str, np.ndarray], Sequence[str] | None], dict[str, np.ndarray]]

RETRY_AFTER = {"Retry-After": "1"}


@dataclass(slots=True)
class RunResult:
    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    batch_size: int  # rows in the runtime call that computed this request
    executions: int = 1  # runtime calls charged to this request (0 for merged/cached ones)
    input_s: float = 0.0  # gathering this request's inputs into the runtime call (a batch)
    output_s: float = 0.0  # taking this request's outputs out of the call's result
    cached: bool = False  # answered from the response cache: nothing was computed


class Scheduler(Protocol):
    """Runs requests for one model version; the registry holds one per version."""

    @property
    def depth(self) -> int: ...  # requests waiting or running

    async def submit(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, deadline: float | None
    ) -> RunResult: ...

    async def close(self) -> None: ...


def rows_of(inputs: Mapping[str, np.ndarray]) -> int:
    """Rows in a request: the first dimension shared by its inputs (1 for scalars)."""
    for array in inputs.values():
        return array.shape[0] if array.ndim else 1
    return 1


def request_deadline(timeout_ms: object = None, timeout_us: object = None) -> float | None:
    """The `time.monotonic()` deadline for a request's timeout, or None for no deadline.

    `timeout_ms` comes from the X-Request-Timeout-Ms header (or a gRPC deadline),
    `timeout_us` from Triton's `timeout` request parameter (microseconds); the shorter wins.
    """
    if timeout_ms is None and timeout_us is None:  # most requests: no deadline
        return None
    budgets = []
    for raw, scale, where in (
        (timeout_ms, 1e-3, "X-Request-Timeout-Ms"),
        (timeout_us, 1e-6, "parameter 'timeout'"),
    ):
        if raw is None:
            continue
        try:
            value = float(raw)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise InvalidInput(f"{where} must be a number") from None
        if not 0 < value < 1e12 or isinstance(raw, bool):
            raise InvalidInput(f"{where} must be a positive number")
        budgets.append(value * scale)
    return time.monotonic() + min(budgets) if budgets else None


class DirectScheduler:
    """One runtime call per request on the executor; bounded in-flight count."""

    def __init__(self, run: RunFn, executor: Executor, max_queue_size: int) -> None:
        self._run = run
        self._executor = executor
        self._max = max_queue_size
        self._depth = 0
        self._drained: asyncio.Event | None = None

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def full(self) -> bool:
        return self._depth >= self._max

    async def submit(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, deadline: float | None
    ) -> RunResult:
        if self._depth >= self._max:
            raise Overloaded("the model's queue is full; retry later", headers=RETRY_AFTER)
        self._depth += 1
        enqueued = time.perf_counter()
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(
            self._executor, self._timed, inputs, outputs, enqueued, deadline
        )
        work.add_done_callback(self._done)  # counts down when the call ends, even after a 504
        if deadline is None:
            return await work
        try:
            return await asyncio.wait_for(
                asyncio.shield(work), max(0.0, deadline - time.monotonic())
            )
        except TimeoutError:
            raise DeadlineExceeded(
                "the request's deadline passed before a result was ready"
            ) from None

    def _done(self, work: asyncio.Future) -> None:
        self._depth -= 1
        if not work.cancelled():
            work.exception()  # retrieved, so an abandoned call's error is not logged as lost
        if self._drained is not None and self._depth == 0:
            self._drained.set()

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
        return RunResult(result, started - enqueued, done - started, rows_of(inputs))

    async def close(self) -> None:
        """Return once in-flight calls have finished."""
        if self._depth:
            self._drained = asyncio.Event()
            await self._drained.wait()
