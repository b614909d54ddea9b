"""The dynamic batcher on its own: merging, splitting, shapes that cannot join, deadlines,
a full queue, and closing only when idle. A fake runtime records every call."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgeserve.errors import DeadlineExceeded, InferenceFailed, ModelNotReady, Overloaded
from edgeserve.serving import batcher as batcher_module
from edgeserve.serving.batcher import BatchPolicy, DynamicBatcher, batch_rows_limit, build_scheduler
from tests.waiting import wait_until_async


class FakeRuntime:
    """Doubles its input; can be held on a gate to keep a call running."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # rows per call
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.gate.wait(10)
        x = inputs["x"]
        if np.isnan(x).any():
            raise InferenceFailed("the model failed to compute this input")
        self.calls.append(x.shape[0])
        result = {"double": x * 2, "sum": x.sum(axis=tuple(range(1, x.ndim)))}
        return {n: result[n] for n in outputs} if outputs else result


def policy(**overrides: object) -> BatchPolicy:
    values: dict = {
        "max_batch_size": 8,
        "max_queue_delay_s": 0.0,
        "max_queue_size": 64,
        "max_concurrent": 1,
        "wait_when_idle": False,
    }
    values.update(overrides)
    return BatchPolicy(**values)


@pytest.fixture
def executor():
    with ThreadPoolExecutor(2) as pool:
        yield pool


def row(value: float, width: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.full((1, width), value, dtype=np.float32)}


async def hold_the_slot(
    batcher: DynamicBatcher, runtime: FakeRuntime, value: float = 0.0
) -> asyncio.Future:
    """Hold the runtime's gate and start one request, returned once it is computing."""
    runtime.gate.clear()
    running = asyncio.ensure_future(batcher.submit(row(value), None, None))
    await asyncio.get_running_loop().run_in_executor(None, runtime.entered.wait, 5)
    return running


async def wait_for(condition, timeout_s: float = 10.0) -> None:
    await wait_until_async(condition, timeout_s, "the condition", interval_s=0.001)


def test_concurrent_requests_share_a_call_and_each_gets_its_own_rows(executor) -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy())

    async def scenario() -> None:
        first = await hold_the_slot(
            batcher, runtime, 100
        )  # the first request runs alone and holds the only slot
        rest = [asyncio.ensure_future(batcher.submit(row(i), None, None)) for i in range(6)]
        await wait_for(lambda: batcher.depth == 7)
        runtime.gate.set()
        results = await asyncio.gather(first, *rest)
        assert results[0].outputs["double"].tolist() == [[200.0] * 3]
        for i, result in enumerate(results[1:]):
            assert result.outputs["double"].tolist() == [[2.0 * i] * 3]
            assert result.batch_size == 6
        assert sum(r.executions for r in results) == 2

    asyncio.run(scenario())
    assert runtime.calls == [1, 6]


class HeldExecutor(ThreadPoolExecutor):
    """Starts nothing until `release()`: lets a test queue requests before any slot runs."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.released = threading.Event()

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        def held():
            assert self.released.wait(10)
            return fn(*args, **kwargs)

        return super().submit(held)

    def release(self) -> None:
        self.released.set()

    def hold(self) -> None:
        self.released.clear()


def test_a_queue_is_shared_among_free_slots_instead_of_one_slot_taking_it_all() -> None:
    runtime = FakeRuntime()
    both_running = threading.Barrier(2, timeout=10)  # fails unless two calls run at once

    def run(inputs, outputs):
        both_running.wait()
        return runtime.run(inputs, outputs)

    with HeldExecutor(2) as pool:
        batcher = DynamicBatcher(run, pool, policy(max_concurrent=2))

        async def scenario() -> None:
            work = [asyncio.ensure_future(batcher.submit(row(i), None, None)) for i in range(8)]
            await wait_for(lambda: len(batcher._queue) == 8)
            pool.release()
            results = await asyncio.wait_for(asyncio.gather(*work), 10)
            assert [r.outputs["sum"].tolist() for r in results] == [[3.0 * i] for i in range(8)]

        asyncio.run(scenario())
    assert runtime.calls == [4, 4]  # both cores busy, not one batch of 8 and an idle slot


def test_a_queue_one_slot_computes_at_once_is_not_split() -> None:
    """A split costs a hand-off per batch; for a fast model the event loop pays it."""
    runtime = FakeRuntime()  # microseconds per row: far under SPLIT_MIN_S
    with HeldExecutor(2) as pool:
        batcher = DynamicBatcher(runtime.run, pool, policy(max_concurrent=2))

        async def scenario() -> None:
            pool.release()
            await batcher.submit(row(0), None, None)  # the batcher learns the speed
            await wait_for(lambda: batcher._slots == 0)
            pool.hold()
            work = [asyncio.ensure_future(batcher.submit(row(i), None, None)) for i in range(8)]
            await wait_for(lambda: len(batcher._queue) == 8)
            pool.release()
            await asyncio.wait_for(asyncio.gather(*work), 10)

        asyncio.run(scenario())
    assert runtime.calls == [1, 8]


def test_a_slot_that_fails_to_take_a_batch_is_given_back_so_the_model_keeps_serving(
    executor, monkeypatch, caplog
) -> None:
    """A bug while taking a batch must not keep the slot counted as busy forever."""
    from edgeserve.serving import batcher as batching

    real_take_batch = batching.take_batch
    failures = iter([RuntimeError("a bug")])
    failed = threading.Event()

    def take_batch_failing_once(queue, max_rows):
        failure = next(failures, None)
        if failure is not None:
            failed.set()
            raise failure
        return real_take_batch(queue, max_rows)

    monkeypatch.setattr(batching, "take_batch", take_batch_failing_once)
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy())

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.submit(row(1), None, None))
        # the slot failed and was given back (waiting for the failure first: before the
        # first task has run, no slot is counted yet either)
        await wait_for(lambda: failed.is_set() and batcher._slots == 0)
        second = asyncio.ensure_future(batcher.submit(row(2), None, None))
        results = await asyncio.wait_for(asyncio.gather(first, second), 10)
        assert [r.outputs["sum"].tolist() for r in results] == [[3.0], [6.0]]

    asyncio.run(scenario())
    assert "batch slot failed" in caplog.text


def test_a_busy_model_lets_other_models_use_the_shared_executor_between_turns(
    monkeypatch,
) -> None:
    monkeypatch.setattr("edgeserve.serving.batcher.SLOT_TURN_S", 0.0)
    order: list[str] = []
    busy, other = FakeRuntime(), FakeRuntime()

    def recorded(name: str, runtime: FakeRuntime):
        def run(inputs, outputs):
            order.append(name)
            return runtime.run(inputs, outputs)

        return run

    with ThreadPoolExecutor(1) as pool:
        busy_batcher = DynamicBatcher(recorded("busy", busy), pool, policy(max_batch_size=1))
        other_batcher = DynamicBatcher(recorded("other", other), pool, policy())

        async def scenario() -> None:
            busy.gate.clear()
            queued = [
                asyncio.ensure_future(busy_batcher.submit(row(i), None, None)) for i in range(4)
            ]
            await asyncio.get_running_loop().run_in_executor(None, busy.entered.wait, 5)
            late = asyncio.ensure_future(other_batcher.submit(row(9), None, None))
            # the other model's slot is queued on the executor, behind the busy one
            await wait_for(lambda: pool._work_queue.qsize() == 1)
            busy.gate.set()
            await asyncio.wait_for(asyncio.gather(late, *queued), 10)

        asyncio.run(scenario())
    assert order == ["busy", "other", "busy", "busy", "busy"]


def test_lone_request_runs_at_once_when_idle(executor) -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy(max_queue_delay_s=30.0))
    result = asyncio.run(asyncio.wait_for(batcher.submit(row(1), None, None), 5))
    assert result.outputs["sum"].tolist() == [3.0]


def test_wait_when_idle_gathers_until_the_batch_is_full(executor) -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(
        runtime.run, executor, policy(max_batch_size=4, max_queue_delay_s=30.0, wait_when_idle=True)
    )

    async def scenario() -> None:
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(row(i), None, None) for i in range(4))), 10
        )
        assert [r.outputs["sum"].tolist() for r in results] == [[0.0], [3.0], [6.0], [9.0]]

    asyncio.run(scenario())
    assert runtime.calls == [4]


def test_requests_that_cannot_join_run_in_their_own_batches(executor) -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy())

    async def scenario() -> None:
        blocker = await hold_the_slot(batcher, runtime)
        waiting = [
            batcher.submit(row(1), None, None),
            batcher.submit(row(2, width=5), None, None),  # other non-batch dims
            batcher.submit(row(3), ["sum"], None),  # other requested outputs
            batcher.submit(row(4), None, None),
            batcher.submit({"x": np.ones((8, 3), np.float32)}, None, None),  # too many rows
        ]
        tasks = [asyncio.ensure_future(w) for w in waiting]
        await wait_for(lambda: batcher.depth == 6)
        runtime.gate.set()
        results = await asyncio.gather(blocker, *tasks)
        assert results[2].outputs["double"].shape == (1, 5)
        assert set(results[3].outputs) == {"sum"}
        assert results[4].outputs["sum"].tolist() == [12.0]
        assert results[5].outputs["double"].shape == (8, 3)

    asyncio.run(scenario())
    assert sorted(runtime.calls) == sorted([1, 2, 1, 1, 8])  # rows 1 and 4 merged


def test_preferred_batch_size_closes_each_batch_and_a_bigger_request_runs_alone(
    executor,
) -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy(preferred_batch_size=3))

    async def scenario() -> None:
        blocker = await hold_the_slot(batcher, runtime)
        waiting = [batcher.submit(row(i), None, None) for i in range(1, 8)]
        waiting.append(batcher.submit({"x": np.ones((5, 3), np.float32)}, None, None))
        tasks = [asyncio.ensure_future(w) for w in waiting]
        await wait_for(lambda: batcher.depth == 9)
        runtime.gate.set()
        results = await asyncio.wait_for(asyncio.gather(blocker, *tasks), 10)
        assert [r.outputs["sum"].tolist() for r in results[:8]] == [[3.0 * i] for i in range(8)]
        assert results[8].outputs["double"].shape == (5, 3)

    asyncio.run(scenario())
    # seven queued rows close at three, not one batch of seven; five rows run alone
    assert runtime.calls == [1, 3, 3, 1, 5]


def test_a_failing_request_does_not_fail_its_batch_neighbours(executor) -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy())

    async def scenario() -> None:
        blocker = await hold_the_slot(batcher, runtime)
        good = asyncio.ensure_future(batcher.submit(row(1), None, None))
        bad = asyncio.ensure_future(batcher.submit(row(float("nan")), None, None))
        await wait_for(lambda: batcher.depth == 3)
        runtime.gate.set()
        await blocker
        assert (await good).outputs["sum"].tolist() == [3.0]
        with pytest.raises(InferenceFailed):
            await bad

    asyncio.run(scenario())


def test_full_queue_refuses_at_once_with_retry_after(executor) -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy(max_queue_size=2))

    async def scenario() -> None:
        running = await hold_the_slot(batcher, runtime)
        queued = [asyncio.ensure_future(batcher.submit(row(i), None, None)) for i in (1, 2)]
        await wait_for(lambda: batcher.depth == 3)
        assert batcher.full
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(row(3), None, None)
        assert refused.value.status == 429
        assert refused.value.headers == {"Retry-After": "1"}
        runtime.gate.set()
        await asyncio.gather(running, *queued)
        assert not batcher.full

    asyncio.run(scenario())


def test_queue_longer_than_its_wait_limit_refuses_once_speed_is_known(executor) -> None:
    runtime = FakeRuntime()
    slow_run = runtime.run

    def run(inputs, outputs):  # about 20 rows/s, so 0.1 s of wait is about 2 queued rows
        time.sleep(0.05)
        return slow_run(inputs, outputs)

    batcher = DynamicBatcher(run, executor, policy(max_queue_wait_s=0.1, max_batch_size=1))

    async def scenario() -> None:
        await batcher.submit(row(0), None, None)  # timed: the batcher now knows its speed
        runtime.entered.clear()
        running = await hold_the_slot(batcher, runtime, 1)
        admitted, refused = [], 0
        for i in range(20):
            try:
                admitted.append(asyncio.ensure_future(batcher.submit(row(i), None, None)))
                await asyncio.sleep(0)  # let the submit run up to its await
                if admitted[-1].done():
                    admitted.pop().result()
            except Overloaded:
                refused += 1
        assert 1 <= len(admitted) <= 4  # far below max_queue_size (64)
        assert refused == 20 - len(admitted)
        assert batcher.full
        runtime.gate.set()
        await asyncio.gather(running, *admitted)

    asyncio.run(scenario())


def test_queue_whose_oldest_request_waited_past_the_limit_refuses_with_429(executor) -> None:
    """No speed is known yet (the only call is held), so the refusal comes from the
    measured age of the queue, not from an estimate."""
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy(max_queue_wait_s=0.01))

    async def scenario() -> None:
        running = await hold_the_slot(batcher, runtime)
        queued = asyncio.ensure_future(batcher.submit(row(1), None, None))
        await wait_for(lambda: batcher.depth == 2)
        await wait_for(lambda: batcher.full)  # the queued request ages past 10 ms
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(row(2), None, None)
        assert refused.value.status == 429
        assert refused.value.headers == {"Retry-After": "1"}
        runtime.gate.set()
        await asyncio.gather(running, queued)
        assert not batcher.full

    asyncio.run(scenario())


def test_an_event_loop_too_busy_to_take_results_refuses_newcomers_until_it_catches_up(
    executor,
) -> None:
    """For a small model the event loop saturates before the runtime does: results wait
    for the loop, not in the queue, so the queue alone would never look full."""
    loop_busy, held = threading.Event(), threading.Event()
    calls = 0

    def run(inputs, outputs):
        nonlocal calls
        calls += 1
        assert (loop_busy if calls == 1 else held).wait(10)
        return {"double": inputs["x"] * 2}

    batcher = DynamicBatcher(run, executor, policy(max_batch_size=1, max_queue_wait_s=0.05))

    async def scenario() -> None:
        first = asyncio.ensure_future(batcher.submit(row(1), None, None))
        second = asyncio.ensure_future(batcher.submit(row(2), None, None))
        await wait_for(lambda: calls == 1)
        loop_busy.set()
        time.sleep(0.2)  # the first result is posted now and waits for the busy loop
        await first
        assert batcher.full  # the second request is still out and the loop was 200 ms late
        with pytest.raises(Overloaded):
            await batcher.submit(row(3), None, None)
        held.set()
        await second
        assert not batcher.full  # nothing out any more: admit again and measure anew

    asyncio.run(scenario())


def test_an_event_loop_running_late_refuses_newcomers_until_it_runs_on_time(executor) -> None:
    """A loop saturated by requests makes them wait in socket buffers, where no queue
    sees them; its own lateness is the signal."""
    from edgeserve.serving import admission as loop_lag

    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy(max_queue_wait_s=0.06))

    async def scenario() -> None:
        monitor = loop_lag.LoopLagMonitor()
        monitor.start()
        for _ in range(loop_lag.MIN_IN_FLIGHT):  # enough requests in flight to blame
            assert monitor.admit()
        try:
            await asyncio.sleep(0.1)
            assert not batcher.full
            time.sleep(0.2)  # the loop is busy: its next lag tick runs 200 ms late
            await wait_for(lambda: loop_lag.lag_s() > 0.1)
            assert batcher.full
            with pytest.raises(Overloaded):
                await batcher.submit(row(1), None, None)
            await wait_for(lambda: not batcher.full)  # the following ticks run on time
            result = await batcher.submit(row(1), None, None)
            assert result.outputs["sum"].tolist() == [3.0]
        finally:
            monitor.stop()

    asyncio.run(scenario())
    assert loop_lag.lag_s() == 0.0


def test_a_late_loop_never_refuses_a_request_when_too_few_are_in_flight_to_blame(
    executor,
) -> None:
    """A loop made late by something else (another process on the CPU, a collection)
    with fewer than MIN_IN_FLIGHT requests in flight: refusing them would make it no
    sooner, so a client sending one request at a time is served (issue 17, noted in 23)."""
    from edgeserve.serving import admission as loop_lag

    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy(max_queue_wait_s=0.06))

    async def scenario() -> None:
        monitor = loop_lag.LoopLagMonitor()
        monitor.start()
        try:
            assert monitor.admit()  # the one request this client has out
            time.sleep(0.2)  # the loop is held up: its next lag tick runs 200 ms late
            await wait_for(lambda: loop_lag.lag_s() > 0.1)
            result = await batcher.submit(row(1), None, None)
            assert result.outputs["sum"].tolist() == [3.0]
        finally:
            monitor.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("wait_s", "speed", "rows"),
    [
        (0.010, 500.0, 5),  # MiniLM-like: 5 rows take the 10 ms budget
        (0.010, 50.0, 1),  # slower than one row per budget: still one row
        (0.250, 500.0, 64),  # the budget allows more than max_batch_size
        (0.0, 500.0, 64),  # no wait limit: no cap
        (0.010, None, 64),  # speed unknown yet: no cap
    ],
)
def test_batch_rows_are_capped_by_what_one_slot_computes_within_the_wait_limit(
    wait_s: float, speed: float | None, rows: int
) -> None:
    assert batch_rows_limit(policy(max_batch_size=64), speed, wait_s) == rows


@pytest.mark.parametrize(
    ("wait_s", "speed", "rows"),
    [
        (0.250, 500.0, 8),  # the preferred size, not max_batch_size
        (0.010, 500.0, 5),  # a tighter wait budget still caps it
    ],
)
def test_batch_rows_stop_at_the_preferred_batch_size(
    wait_s: float, speed: float, rows: int
) -> None:
    limit = batch_rows_limit(policy(max_batch_size=64, preferred_batch_size=8), speed, wait_s)
    assert limit == rows


def test_expired_deadline_is_answered_504_and_never_computed(executor) -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy())

    async def scenario() -> None:
        running = await hold_the_slot(batcher, runtime)
        doomed = batcher.submit(row(7), None, time.monotonic() + 0.05)
        with pytest.raises(DeadlineExceeded) as late:
            await asyncio.wait_for(doomed, 5)  # answered while the slot is still busy
        assert late.value.status == 504
        runtime.gate.set()
        await running
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(row(8), None, time.monotonic() - 1)

    asyncio.run(scenario())
    assert runtime.calls == [1]  # only the first request was computed


def test_close_waits_for_queued_and_running_work(executor) -> None:
    runtime = FakeRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy(max_queue_delay_s=30.0))

    async def scenario() -> None:
        runtime.gate.clear()
        work = [asyncio.ensure_future(batcher.submit(row(i), None, None)) for i in range(3)]
        await wait_for(lambda: batcher.depth == 3)
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0)  # one loop turn: close() runs up to its first wait
        with pytest.raises(Overloaded):  # it has begun: newcomers are refused
            await batcher.submit(row(9), None, None)
        assert not closing.done()  # and it waits for the three held requests
        runtime.gate.set()
        await asyncio.wait_for(closing, 5)
        assert all(w.done() and not w.exception() for w in work)

    asyncio.run(scenario())


def test_models_without_a_batch_dimension_get_one_call_per_request(executor) -> None:
    runtime = FakeRuntime()
    scheduler = build_scheduler(runtime.run, executor, policy(max_batch_size=0))
    assert not isinstance(scheduler, DynamicBatcher)
    result = asyncio.run(scheduler.submit(row(2), None, None))
    assert result.outputs["sum"].tolist() == [6.0]


def test_requests_after_executor_shutdown_get_503() -> None:
    runtime = FakeRuntime()
    pool = ThreadPoolExecutor(1)
    pool.shutdown()
    batcher = DynamicBatcher(runtime.run, pool, policy())
    with pytest.raises(ModelNotReady):
        asyncio.run(batcher.submit(row(1), None, None))


class ThreadRecordingRuntime(FakeRuntime):
    """FakeRuntime that also records which thread made each call, and can be slowed."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self.threads: list[int] = []
        self.delay_s = delay_s

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
    ) -> dict[str, np.ndarray]:
        self.threads.append(threading.get_ident())
        if self.delay_s:
            time.sleep(self.delay_s)
        return super().run(inputs, outputs)


def lone_requests_threads(
    runtime: ThreadRecordingRuntime, batch_policy: BatchPolicy, others_in_flight: int
) -> tuple[int, list[int]]:
    """Five requests one after another, each counted in flight at a started loop gate
    beside `others_in_flight` others, each sent once the last one's slot has let go (the
    result reaches the loop just before the slot finds the queue empty and releases):
    (the event loop's thread id, each call's thread)."""
    from edgeserve.serving.admission import LoopLagMonitor

    async def scenario() -> int:
        gate = LoopLagMonitor(0.01)
        gate.start()
        try:
            with ThreadPoolExecutor(2) as pool:
                batcher = DynamicBatcher(runtime.run, pool, batch_policy)
                for _ in range(others_in_flight):
                    assert gate.admit()
                for value in range(5):
                    assert gate.admit()
                    result = await batcher.submit(row(value), None, None)
                    gate.leave()
                    assert result.outputs["sum"].tolist() == [3.0 * value]
                    await wait_for(lambda: batcher._slots == 0)  # the slot has let go
        finally:
            gate.stop()
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    return loop_thread, runtime.threads


def test_a_fast_request_alone_is_computed_on_the_event_loop_once_its_speed_is_known() -> None:
    """Handing a call of a few microseconds to a worker thread and back costs more than
    the call, and alone there is nothing to merge it with."""
    loop_thread, threads = lone_requests_threads(ThreadRecordingRuntime(), policy(), 0)
    assert threads[0] != loop_thread  # the first call is timed on a slot
    assert threads[1:] == [loop_thread] * 4


@pytest.mark.parametrize(
    ("runtime", "batch_policy", "others"),
    [
        (ThreadRecordingRuntime(), policy(), 1),  # another request in flight: it may merge
        (ThreadRecordingRuntime(), policy(wait_when_idle=True), 0),  # held for company
        (ThreadRecordingRuntime(delay_s=0.002), policy(), 0),  # too slow for the loop
    ],
    ids=["not-alone", "wait-when-idle", "slow-model"],
)
def test_requests_that_may_merge_or_take_long_go_to_a_slot(
    runtime: ThreadRecordingRuntime, batch_policy: BatchPolicy, others: int
) -> None:
    loop_thread, threads = lone_requests_threads(runtime, batch_policy, others)
    assert len(threads) == 5 and loop_thread not in threads


def test_without_a_front_door_count_every_request_goes_to_a_slot(executor) -> None:
    """Work that did not come through the front door (batch jobs, streams, tests of the
    batcher alone) is not known to be alone."""
    runtime = ThreadRecordingRuntime()
    batcher = DynamicBatcher(runtime.run, executor, policy())

    async def scenario() -> int:
        for value in range(5):
            await batcher.submit(row(value), None, None)
        return threading.get_ident()

    loop_thread = asyncio.run(scenario())
    assert len(runtime.threads) == 5 and loop_thread not in runtime.threads


def test_a_failing_inline_call_is_a_500_and_a_bad_input_its_own_error() -> None:
    from edgeserve.serving.admission import LoopLagMonitor

    class Breaks(ThreadRecordingRuntime):
        def run(self, inputs, outputs):  # type: ignore[override]
            if float(inputs["x"][0, 0]) == 7.0:
                raise ZeroDivisionError("a bug in the runtime wrapper")
            return super().run(inputs, outputs)

    runtime = Breaks()

    async def scenario() -> None:
        gate = LoopLagMonitor(0.01)
        gate.start()
        try:
            with ThreadPoolExecutor(1) as pool:
                batcher = DynamicBatcher(runtime.run, pool, policy())
                assert gate.admit()
                await batcher.submit(row(1), None, None)  # timed on a slot
                await wait_for(lambda: batcher._slots == 0)
                with pytest.raises(InferenceFailed, match="failed to compute this input"):
                    await batcher.submit(row(7), None, None)
                with pytest.raises(InferenceFailed, match="failed to compute this input"):
                    await batcher.submit(row(float("nan")), None, None)  # FakeRuntime's own
                assert (await batcher.submit(row(2), None, None)).outputs["sum"].tolist() == [6.0]
        finally:
            gate.stop()

    asyncio.run(scenario())
    assert len(set(runtime.threads[1:])) == 1  # all on the loop after the first


class CountingExecutor(ThreadPoolExecutor):
    """Counts the tasks submitted: each is a slot launched by the event loop."""

    submitted = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_an_idle_slot_takes_the_next_request_without_a_new_executor_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Launching a slot costs the event loop an executor submit; a slot that lingers after
    its batch takes the next request on the thread it has. Closing wakes it at once."""
    monkeypatch.setattr(batcher_module, "LINGER_S", 600.0)  # never runs out in this test
    runtime = FakeRuntime()
    with CountingExecutor(2) as pool:
        batcher = DynamicBatcher(runtime.run, pool, policy())

        async def scenario() -> None:
            for i in range(3):
                await batcher.submit(row(i), None, None)
                # the result reaches the loop before the slot's thread starts lingering:
                # the next request is the lingering slot's only once it waits
                while batcher._lingering != 1:
                    await asyncio.sleep(0.001)
            assert batcher._slots == 1  # the slot is still there, lingering
            await batcher.close()  # would wait out LINGER_S if the slot were not woken

        asyncio.run(asyncio.wait_for(scenario(), 10))
        assert batcher._slots == 0
    assert pool.submitted == 1
    assert runtime.calls == [1, 1, 1]
