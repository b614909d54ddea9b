"""Scheduling of runtime calls for one model version: dynamic batching and admission control.

`DynamicBatcher` merges concurrent requests into one runtime call: when a worker slot is
free it takes the queued requests that can share a batch with the oldest one (same
non-batch dimensions, dtypes and requested outputs), up to `max_batch_size` rows, or its
share of the queue when other slots are free too, so that all of them compute. When
the box is idle a lone request runs at once; when other batches are already running it
may wait up to `max_queue_delay_ms` for company. The queue is bounded: a request that
finds it full is refused at once with `Overloaded` (429 + Retry-After), so overload
costs no memory. A request whose deadline passes before it runs is answered with
`DeadlineExceeded` (504) and never computed.

`build_scheduler` picks it, or `DirectScheduler` (edgeserve/serving/scheduler.py) for models
without a batch dimension. The event loop queues requests and resolves their futures;
the executor slots take and compute the batches (`DynamicBatcher._slot`). The one
exception: a request alone at the front door, on an idle batcher, whose call the
measured speed puts under INLINE_MAX_S is computed on the event loop itself, where the
hand-off to a slot and back would cost more than the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from edgeserve.errors import (
    DeadlineExceeded,
    EdgeserveError,
    InferenceFailed,
    ModelNotReady,
    Overloaded,
)
from edgeserve.serving.admission import crowded as loop_crowded
from edgeserve.serving.admission import in_flight as front_door_in_flight
from edgeserve.serving.admission import lag_s as loop_lag_s
from edgeserve.serving.offered_load import OfferedLoad
from edgeserve.serving.scheduler import RETRY_AFTER, DirectScheduler, RunFn, RunResult, rows_of

log = logging.getLogger(__name__)


# Longest a slot keeps computing one model's batches before it queues itself again behind
# other models' work on the shared executor.
SLOT_TURN_S = 0.05
# A queue that one slot computes faster than this is not split between free slots.
SPLIT_MIN_S = 0.001
# The event loop's lag refuses requests only beyond this, even with a tighter wait budget:
# one long pass over many ready requests is normal under load, a saturated loop is not.
LOOP_LAG_MIN_S = 0.05
# A request alone (the only one in flight at the front door, the batcher idle) whose call
# is expected to take less than this runs on the event loop itself: handing it to a
# worker thread and back costs more than that (bench/RESULTS.md: for digits, ~15 µs per
# call against ~250 µs of CPU for the hand-off), and there is nobody to merge it with.
INLINE_MAX_S = 200e-6
# A slot that finds the queue empty waits this long for the next request before it gives
# its executor thread back: waking a waiting slot costs the event loop a notify, starting
# one an executor `submit` (a Future, a work item, the pool's thread accounting), which
# for a small model at 16 connections was ~7 % of the loop (bench/RESULTS.md). Short
# enough that other models sharing the executor hardly notice the thread held.
LINGER_S = 0.002
STALE_REFUSAL = "the model is overloaded and this request waited past its limit; retry later"


@dataclass(frozen=True)
class BatchPolicy:
    """How one model version's requests are merged; pure data, from model.toml."""

    max_batch_size: int  # rows per runtime call
    max_queue_delay_s: float  # longest a request waits for company
    max_queue_size: int  # requests waiting (not yet running) before new ones are refused
    max_concurrent: int  # batches running at once (executor slots this model may use)
    wait_when_idle: bool = False  # also wait for company when nothing else is running
    max_queue_wait_s: float = 0.0  # refuse when the estimated wait exceeds this; 0 = off
    preferred_batch_size: int = 0  # close a batch at this many rows; 0 = max_batch_size
    # The wait budget instead of max_queue_wait_s while the model is offered clearly more
    # rows than it computes (edgeserve/serving/offered_load.py); 0 = max_queue_wait_s always.
    overload_queue_wait_s: float = 0.0


def batch_key(inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None) -> Hashable:
    """Requests with equal keys can be concatenated along axis 0 into one call."""
    return (
        tuple([(n, a.dtype.str, a.shape[1:]) for n, a in sorted(inputs.items())]),
        tuple(outputs) if outputs else None,
    )


def batch_rows_limit(policy: BatchPolicy, slot_rows_per_s: float | None, wait_s: float) -> int:
    """preferred_batch_size (else max_batch_size), or fewer: the rows one slot computes in
    the wait budget `wait_s` (0 = none). A single request larger than this still runs,
    alone (`take_batch`).

    A request's latency is its queue wait plus its batch's compute time; capping both
    by the same budget keeps accepted latency near the unloaded one under overload,
    where every batch would otherwise be full (for a compute-bound model a batch of 64
    takes about 64 times one row). No cap until a batch has been timed.
    """
    rows = policy.preferred_batch_size or policy.max_batch_size
    if wait_s and slot_rows_per_s:
        rows = min(rows, max(1, int(slot_rows_per_s * wait_s)))
    return rows


class _Pending:
    """One admitted request, from `submit` until its future is resolved."""

    __slots__ = ("deadline", "enqueued", "future", "inputs", "key", "outputs", "rows", "timer")

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str] | None,
        deadline: float | None,
        future: asyncio.Future[RunResult],
        rows: int,
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.deadline = deadline
        self.future = future
        self.rows = rows  # rows_of(inputs)
        self.key = batch_key(inputs, outputs)
        self.enqueued = time.perf_counter()
        self.timer: asyncio.TimerHandle | None = None


def take_batch(queue: deque[_Pending], max_rows: int) -> list[_Pending]:
    """Remove and return the oldest request plus every later one that fits its batch.

    Requests that cannot join (other shapes or outputs, or too many rows) stay queued in
    their order, so nothing starves: the next batch starts with the oldest of them.
    """
    head = queue.popleft()
    batch = [head]
    rows = head.rows
    if rows >= max_rows or not queue:
        return batch
    kept: list[_Pending] = []
    while queue and rows < max_rows:
        item = queue.popleft()
        if item.key == head.key and rows + item.rows <= max_rows:
            batch.append(item)
            rows += item.rows
        else:
            kept.append(item)
    queue.extendleft(reversed(kept))
    return batch


class DynamicBatcher:
    """Merges concurrent requests for one model version into batched runtime calls.

    The event loop only queues requests and delivers results; the executor slots take
    their batches themselves. A slot that finishes a batch posts the results to the loop
    and starts on the next queued one at once, on the thread it already has: handing
    each start back to the loop cost a thread wake-up and a loop turn per batch, and
    measured on MiniLM INT8 at 32 connections that left a core idle a third of the time.
    """

    def __init__(self, run: RunFn, executor: Executor, policy: BatchPolicy) -> None:
        self._run = run
        self._executor = executor
        self._policy = policy
        self._lock = threading.Lock()  # the queue and the counts: the loop adds, slots take
        self._company = threading.Condition(self._lock)  # a slot waiting for more rows
        self._waiting = 0  # slots waiting on _company
        self._work = threading.Condition(self._lock)  # a slot lingering for a new request
        self._lingering = 0  # slots waiting on _work (still counted in _slots)
        self._queue: deque[_Pending] = deque()
        self._queued_rows = 0
        # One slot's speed (rows/s) per batch-size class (1, 2-3, 4-7, ...), moving averages:
        # a queue drains in big batches, so its wait is estimated at the best speed seen.
        self._slot_rows_per_s: dict[int, float] = {}
        self._best_rows_per_s = 0.0  # the best of them (0 until a batch is timed)
        self._slots = 0  # slots working for this batcher (computing or taking a batch)
        self._computing = 0  # slots inside a runtime call
        self._running_requests = 0
        # How late the event loop took the last batch's results: when it is busier than
        # it can keep up with, computed results wait there, not in the queue.
        self._delivery_lag_s = 0.0
        # Rows/s asked of this version, refused ones too: only read with an overload budget.
        self._offered = OfferedLoad() if policy.overload_queue_wait_s else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._idle: asyncio.Event | None = None

    @property
    def depth(self) -> int:
        return len(self._queue) + self._running_requests

    @property
    def full(self) -> bool:
        """True when a new request would be refused: lets callers refuse before decoding.

        A True answer counts as one row offered: the caller refuses the request, which
        never reaches `submit` (where every other request is counted).
        """
        if self._refusal(1) is None:
            return False
        if self._offered is not None:
            self._offered.offer(1, time.perf_counter())
        return True

    def _overloaded(self) -> bool:
        """Offered clearly more rows than the slots compute (edgeserve/serving/offered_load.py),
        with an overload budget to apply. A closed loop of clients never offers more than
        it is answered, so it is never overloaded however many clients there are."""
        offered = self._offered
        if offered is None or not self._best_rows_per_s:
            return False
        capacity = self._best_rows_per_s * self._policy.max_concurrent
        return offered.exceeds(capacity, time.perf_counter())

    def _wait_budget_s(self) -> float:
        """How long a newcomer may wait: overload_queue_wait_s while overloaded (then a
        longer queue only adds latency, not throughput), else max_queue_wait_s."""
        policy = self._policy
        if policy.overload_queue_wait_s and self._overloaded():
            return policy.overload_queue_wait_s
        return policy.max_queue_wait_s

    def _refuse_stale(self) -> None:
        """Under the lock, while overloaded: refuse (429) the queued requests that have
        already waited past the overload budget. They were admitted under the long budget
        before the overload was seen, and computing them now would answer them late and
        keep every later request waiting behind them."""
        if not self._overloaded():
            return
        policy = self._policy
        oldest = time.perf_counter() - policy.overload_queue_wait_s - policy.max_queue_delay_s
        queue = self._queue
        stale = []
        while queue and queue[0].enqueued < oldest:
            pending = queue.popleft()
            self._queued_rows -= pending.rows
            stale.append(pending)
        if stale:
            self._running_requests += len(stale)  # until _deliver resolves them
            refusal = Overloaded(STALE_REFUSAL, headers=RETRY_AFTER)
            self._post(stale, [refusal] * len(stale))

    def _refusal(self, rows: int) -> str | None:
        """Why a request of `rows` would be refused now (429), or None to admit it."""
        if self._closed:
            return "the model version is being replaced; retry"
        if len(self._queue) >= self._policy.max_queue_size:
            return "the model's queue is full; retry later"
        if self._too_slow(rows):
            return "the model's queue is longer than its wait limit; retry later"
        return None

    def _too_slow(self, rows: int) -> bool:
        """Would a request of `rows` wait longer than the wait budget (`_wait_budget_s`)
        behind the queue?

        Yes when the oldest queued request has already waited that long (beyond the
        max_queue_delay_s it may be held for company by design), when the event loop
        took the results of the last batch still out that late, or when the loop itself
        runs that late (edgeserve/serving/admission.py) with enough requests in flight to
        be what makes it late: all measured, so they also catch an event loop too busy
        answering other clients (for a small model the loop, not the runtime, is what
        saturates), and a client sending one request at a time on a box loaded by
        something else is never refused. Else the estimate: queued rows over the measured
        speed of all slots, which reacts before the queue has aged; until a batch has
        been timed there is none and only max_queue_size applies.
        """
        wait_s = self._wait_budget_s()
        if not wait_s:
            return False
        if self._running_requests and self._delivery_lag_s > wait_s:
            return True
        if loop_lag_s() > max(wait_s, LOOP_LAG_MIN_S) and loop_crowded():
            return True  # fewer in flight cannot be what makes the loop late
        queue = self._queue
        if not queue:  # the common case, without raising
            return False
        try:
            age_s = time.perf_counter() - queue[0].enqueued
        except IndexError:  # a slot took the last request meanwhile
            return False
        policy = self._policy
        if age_s > wait_s + policy.max_queue_delay_s:
            return True
        if not self._best_rows_per_s:
            return False
        rate = self._best_rows_per_s * policy.max_concurrent
        return (self._queued_rows + rows) / rate > wait_s

    def _batch_rows(self) -> int:
        speeds = self._slot_rows_per_s
        speed = max(speeds.values()) if speeds else None
        return batch_rows_limit(self._policy, speed, self._wait_budget_s())

    async def submit(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, deadline: float | None
    ) -> RunResult:
        rows = rows_of(inputs)
        if self._offered is not None:
            self._offered.offer(rows, time.perf_counter())
        refusal = self._refusal(rows)
        if refusal is not None:
            raise Overloaded(refusal, headers=RETRY_AFTER)
        loop = self._loop = asyncio.get_running_loop()
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded("the request's deadline passed before it could run")
        if self._runs_inline(rows):
            return self._run_inline(inputs, outputs, rows)
        pending = _Pending(inputs, outputs, deadline, loop.create_future(), rows)
        if deadline is not None:
            pending.timer = loop.call_later(remaining, _expire, pending)
        with self._lock:
            self._queue.append(pending)
            self._queued_rows += pending.rows
            start = self._wake_or_count_slot()
            if not start and self._waiting:
                self._company.notify()
        if start:
            self._launch()
        try:
            return await pending.future
        except asyncio.CancelledError:
            pending.future.cancel()  # the caller went away: it is skipped if not yet running
            raise

    def _runs_inline(self, rows: int) -> bool:
        """Whether a request of `rows` is computed on the event loop: alone, on an idle
        batcher that would not hold it for company, and fast by the measured speed."""
        if (
            self._queue
            or self._slots > self._lingering  # a lingering slot is idle
            or self._running_requests
            or self._policy.wait_when_idle
            or front_door_in_flight() != 1  # 0: not a front-door request, or no gate
        ):
            return False
        speed = self._slot_rows_per_s.get(rows.bit_length())
        return speed is not None and speed > 0 and rows / speed < INLINE_MAX_S

    def _run_inline(
        self, inputs: dict[str, np.ndarray], outputs: Sequence[str] | None, rows: int
    ) -> RunResult:
        """One call on the calling (event loop) thread; errors as a slot reports them."""
        try:
            result = self._call(inputs, outputs, rows, 0.0)
        except Exception as exc:  # a bug: fail the request, as a slot would
            log.error("inline call failed error=%r", exc)
            raise InferenceFailed("the model failed to compute this input") from None
        if isinstance(result, EdgeserveError):
            raise result
        self._learn_speed([result])
        return result

    def _wake_or_count_slot(self) -> bool:
        """Under the lock, for newly queued work: wake a lingering slot, else say whether
        a new slot is to be launched (its count is taken)."""
        if self._lingering:
            self._work.notify()  # it looks at the queue again, whatever woke it
            return False
        if self._slots < self._policy.max_concurrent:
            self._slots += 1
            return True
        return False

    def _launch(self) -> None:
        """Put one slot on the executor (its count is already taken)."""
        try:
            self._executor.submit(self._slot)
        except RuntimeError:  # the executor is shut down: the server is stopping
            with self._lock:
                self._slots -= 1
                stranded = list(self._queue)
                self._queue.clear()
                self._queued_rows = 0
                self._running_requests += len(stranded)
            self._post(stranded, [ModelNotReady("the server is shutting down")] * len(stranded))

    def _slot(self) -> None:
        """On a worker thread: compute batches until the queue is empty or the turn is up.

        A turn is bounded so that other models sharing the executor get their slots in
        between: after SLOT_TURN_S of work a slot with more to do queues itself again.
        """
        turn_ends = time.perf_counter() + SLOT_TURN_S
        while True:
            try:
                batch = self._take()
            except BaseException as exc:  # a bug: give the slot back, or the model stalls
                log.error("batch slot failed error=%r", exc)
                with self._lock:
                    self._slots -= 1
                return
            if batch is None:  # the queue is empty and this slot is released
                if self._closed:
                    self._post([], [])  # close() may be waiting for the last slot
                return
            try:
                results = self._execute(batch)
                self._learn_speed(results)
            except BaseException as exc:  # a bug: fail the batch, not the slot
                log.error("batch failed requests=%d error=%r", len(batch), exc)
                results = [InferenceFailed("the model failed to compute this input")] * len(batch)
            with self._lock:
                self._computing -= 1
            self._post(batch, results)
            if time.perf_counter() > turn_ends:
                self._launch()
                return

    def _take(self) -> list[_Pending] | None:
        """The next batch for this slot, or None (and the slot is released) when idle.

        With fewer rows queued than a batch holds and other slots busy, the oldest
        request may wait up to max_queue_delay_s for company; on an otherwise idle model
        it runs at once unless wait_when_idle.
        """
        policy = self._policy
        linger_until = 0.0
        while True:
            with self._lock:
                queue = self._queue
                while queue and queue[0].future.done():  # expired or cancelled while waiting
                    self._queued_rows -= queue.popleft().rows
                self._refuse_stale()
                if not queue:
                    now = time.perf_counter()
                    if not linger_until:
                        linger_until = now + LINGER_S
                    if self._closed or now >= linger_until:
                        self._slots -= 1
                        return None
                    self._lingering += 1
                    try:
                        self._work.wait(linger_until - now)  # woken by submit and close()
                    finally:  # a count left high would keep every new slot from starting
                        self._lingering -= 1
                    continue
                rows = self._batch_rows()
                wait = 0.0
                if (
                    self._queued_rows < rows
                    and policy.max_queue_delay_s > 0
                    and (self._computing > 0 or policy.wait_when_idle)
                    and not self._closed
                ):
                    wait = queue[0].enqueued + policy.max_queue_delay_s - time.perf_counter()
                if wait <= 0:
                    batch = take_batch(queue, self._share(rows))
                    self._queued_rows -= sum(p.rows for p in batch)
                    self._running_requests += len(batch)
                    self._computing += 1
                    more = bool(queue) and self._wake_or_count_slot()
                    break

                self._waiting += 1
                self._company.wait(wait)  # woken by each new request, and by close()
                self._waiting -= 1
        if more:
            self._launch()  # a free slot for the rest of the queue
        return batch

    def _share(self, rows: int) -> int:
        """This slot's rows: the queue up to `rows`, or an even share of it when other
        slots are free, so that they compute too instead of idling beside one big batch.

        Each share costs a hand-off to the event loop, so a queue that one slot computes
        in under SPLIT_MIN_S (small models, bound by the event loop) is not split.
        """
        free = self._policy.max_concurrent - self._computing
        queued = min(self._queued_rows, rows)
        if free <= 1 or queued <= 1:
            return rows
        speeds = self._slot_rows_per_s
        speed = speeds.get(queued.bit_length()) or max(speeds.values(), default=0.0)
        if speed and queued / speed < SPLIT_MIN_S:
            return rows
        return -(-queued // free)

    def _post(self, batch: list[_Pending], results: list[RunResult | BaseException]) -> None:
        """Hand a batch's results to the event loop, which owns the futures."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(self._deliver, batch, results, time.perf_counter())

    def _execute(self, batch: list[_Pending]) -> list[RunResult | BaseException]:
        """On a worker thread: one runtime call for the whole batch, split per request."""
        started = time.perf_counter()
        live = [p for p in batch if not p.future.done()]  # a deadline may have passed meanwhile
        if not live:
            return [DeadlineExceeded("the request's deadline passed before it could run")] * len(
                batch
            )
        if len(live) == 1:
            return _fill(batch, live, [self._run_one(live[0], started)])
        try:
            merged = {n: np.concatenate([p.inputs[n] for p in live]) for n in live[0].inputs}
            gathered = time.perf_counter()
            outputs = self._run(merged, live[0].outputs)
        except EdgeserveError:
            # One bad request must not fail its neighbours: run each alone to find it.
            return _fill(batch, live, [self._run_one(p, started) for p in live])
        done = time.perf_counter()
        total = sum(p.rows for p in live)
        if any(a.ndim == 0 or a.shape[0] != total for a in outputs.values()):
            # An output without a batch dimension cannot be split back per request.
            return _fill(batch, live, [self._run_one(p, started) for p in live])
        parts = []
        offset = 0
        for p in live:
            parts.append({n: a[offset : offset + p.rows] for n, a in outputs.items()})
            offset += p.rows
        # Like Triton, every request in the batch is charged the batch's whole times.
        split_s = time.perf_counter() - done
        results: list[RunResult | BaseException] = [
            RunResult(
                part,
                started - p.enqueued,
                done - gathered,
                total,
                1 if i == 0 else 0,
                input_s=gathered - started,
                output_s=split_s,
            )
            for i, (p, part) in enumerate(zip(live, parts, strict=True))
        ]
        return _fill(batch, live, results)

    def _run_one(self, p: _Pending, started: float) -> RunResult | BaseException:
        return self._call(p.inputs, p.outputs, p.rows, started - p.enqueued)

    def _call(
        self,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str] | None,
        rows: int,
        queue_s: float,
    ) -> RunResult | EdgeserveError:
        """One runtime call of `rows`, timed; a domain error is returned, not raised."""
        began = time.perf_counter()
        try:
            computed = self._run(inputs, outputs)
        except EdgeserveError as exc:
            return exc
        return RunResult(computed, queue_s, time.perf_counter() - began, rows)

    def _deliver(
        self, batch: list[_Pending], results: list[RunResult | BaseException], posted: float
    ) -> None:
        """On the event loop: resolve each caller's future with its own result."""
        self._delivery_lag_s = time.perf_counter() - posted
        with self._lock:
            self._running_requests -= len(batch)
            idle = not self._queue and not self._slots and not self._running_requests
        for p, result in zip(batch, results, strict=True):
            if p.timer is not None:
                p.timer.cancel()
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
        if idle and self._idle is not None:
            self._idle.set()

    def _learn_speed(self, results: list[RunResult | BaseException]) -> None:
        for r in results:
            # a call of no rows says nothing about speed (and a speed of 0 divides by zero)
            if isinstance(r, RunResult) and r.executions and r.compute_s > 0 and r.batch_size > 0:
                speed = r.batch_size / r.compute_s
                size_class = r.batch_size.bit_length()
                with self._lock:
                    speeds = self._slot_rows_per_s
                    old = speeds.get(size_class)
                    speeds[size_class] = speed if not old else 0.8 * old + 0.2 * speed
                    self._best_rows_per_s = max(speeds.values())

    async def close(self) -> None:
        """Refuse new requests, then return once queued and running work has finished.

        Closing also ends the waits for company, so queued requests start at once.
        """
        self._closed = True
        self._idle = asyncio.Event()
        with self._lock:
            self._company.notify_all()
            self._work.notify_all()
            busy = bool(self._queue) or self._slots > 0 or self._running_requests > 0
        if busy:
            await self._idle.wait()


def _expire(pending: _Pending) -> None:
    if not pending.future.done():
        pending.future.set_exception(
            DeadlineExceeded("the request's deadline passed before a result was ready")
        )


def _fill(
    batch: list[_Pending], live: list[_Pending], results: list[RunResult | BaseException]
) -> list[RunResult | BaseException]:
    """Results in `batch` order; requests that expired before the call get 504."""
    if len(live) == len(batch):
        return results
    by_id = {id(p): r for p, r in zip(live, results, strict=True)}
    expired = DeadlineExceeded("the request's deadline passed before it could run")
    return [by_id.get(id(p), expired) for p in batch]


def build_scheduler(
    run: RunFn, executor: Executor, policy: BatchPolicy
) -> DynamicBatcher | DirectScheduler:
    """A batcher for models with a batch dimension, else one call per request."""
    if policy.max_batch_size > 1:
        return DynamicBatcher(run, executor, policy)
    return DirectScheduler(run, executor, policy.max_queue_size + policy.max_concurrent)
