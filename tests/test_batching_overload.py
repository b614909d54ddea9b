"""The overload wait budget: a model offered clearly more rows than it computes keeps its
queue short (overload_queue_wait_ms), while a closed loop of clients, however long the
queue it keeps, is never refused for it (edgeserve/serving/offered_load.py)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgeserve.errors import Overloaded
from edgeserve.serving.batcher import BatchPolicy, DynamicBatcher
from edgeserve.serving.offered_load import OVERLOAD_FACTOR, TIME_CONSTANT_S, OfferedLoad
from edgeserve.serving.scheduler import RunResult

CALL_S = 0.005  # every runtime call takes this long, whatever its rows


def slow_run(inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None) -> dict:
    time.sleep(CALL_S)
    return {"double": inputs["x"] * 2}


def batcher(overload_wait_s: float) -> DynamicBatcher:
    policy = BatchPolicy(
        max_batch_size=8,
        max_queue_delay_s=0.0,
        max_queue_size=100_000,  # only the wait budgets refuse here
        max_concurrent=1,
        max_queue_wait_s=10.0,
        overload_queue_wait_s=overload_wait_s,
    )
    return DynamicBatcher(slow_run, ThreadPoolExecutor(1), policy)


def one_row() -> dict[str, np.ndarray]:
    return {"x": np.ones((1, 3), dtype=np.float32)}


async def closed_loop(b: DynamicBatcher, clients: int, seconds: float) -> tuple[int, int]:
    """`clients` each sending its next request when the last is answered: (ok, refused)."""
    counts = [0, 0]
    stop = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < stop:
            try:
                await b.submit(one_row(), None, None)
                counts[0] += 1
            except Overloaded:
                counts[1] += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return counts[0], counts[1]


async def open_loop(b: DynamicBatcher, per_ms: int, seconds: float) -> tuple[int, int]:
    """`per_ms` requests every millisecond whatever the answers: (ok, refused)."""
    tasks = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        tasks += [asyncio.ensure_future(b.submit(one_row(), None, None)) for _ in range(per_ms)]
        await asyncio.sleep(0.001)
    results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    refused = sum(isinstance(r, Overloaded) for r in results)
    assert all(isinstance(r, (RunResult, Overloaded)) for r in results)
    return len(results) - refused, refused


def test_a_closed_loop_keeps_the_long_budget_however_long_its_queue() -> None:
    """16 clients keep about two batches queued, far past the 1 ms overload budget, but
    they offer no more than the model answers: nobody is refused."""
    b = batcher(overload_wait_s=0.001)
    ok, refused = asyncio.run(closed_loop(b, clients=16, seconds=1.0))
    assert refused == 0 and ok > 100


@pytest.mark.parametrize(("overload_wait_s", "refuses"), [(0.001, True), (0.0, False)])
def test_an_open_loop_flood_is_held_to_the_overload_budget(
    overload_wait_s: float, refuses: bool
) -> None:
    """A request every 1/8 ms against ~1,600 rows/s: with an overload budget newcomers
    are refused once the flood is seen; without one the 10 s budget admits them all."""

    async def scenario() -> tuple[int, int]:
        b = batcher(overload_wait_s)
        await closed_loop(b, clients=8, seconds=0.1)  # the slot's speed is known
        return await open_loop(b, per_ms=8, seconds=0.6)

    ok, refused = asyncio.run(scenario())
    assert ok > 0
    assert (refused > 0) is refuses


def test_the_offered_rate_estimates_a_steady_rate_and_forgets_an_old_one() -> None:
    load = OfferedLoad()
    now = 0.0
    for _ in range(5000):  # 1,000 rows/s for 5 s: ten time constants
        now += 0.001
        load.offer(1, now)
    assert load.rate(now) == pytest.approx(1000, rel=0.01)
    assert load.exceeds(1000 / (OVERLOAD_FACTOR * 1.1), now)
    assert not load.exceeds(1000 / (OVERLOAD_FACTOR * 0.9), now)
    later = now + 3 * TIME_CONSTANT_S
    assert load.rate(later) == pytest.approx(1000 * math.exp(-3), rel=0.01)
    assert not load.exceeds(0.0, later)  # an unknown speed is never exceeded
