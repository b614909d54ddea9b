"""The event loop's lag gate: which share of inference requests the front door refuses so
that the loop keeps answering in time (edgeserve/serving/admission.py)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from edgeserve.serving import admission as loop_lag
from edgeserve.serving.admission import LagShedder, LoopLagMonitor

TARGET_S = 0.01
TICK_S = loop_lag.TICK_S


def ticks(shedder: LagShedder, count: int, lag_s: float, busy: float = 0.5) -> None:
    for _ in range(count):
        shedder.observe(lag_s, busy, TICK_S + lag_s)


def admitted_of(shedder: LagShedder, calls: int) -> int:
    return sum(shedder.admit() for _ in range(calls))


def loaded() -> LagShedder:
    """A shedder whose loop has been busy and on time for a while, with enough requests
    in flight for refusals to count (admitted ones are never answered here)."""
    shedder = LagShedder(TARGET_S)
    ticks(shedder, 50, lag_s=0.0, busy=1.0)
    assert shedder.busy > loop_lag.BUSY and shedder.share == 0.0
    assert admitted_of(shedder, loop_lag.MIN_IN_FLIGHT) == loop_lag.MIN_IN_FLIGHT
    assert shedder.crowded
    return shedder


def test_a_loop_on_time_refuses_nothing_even_when_busy() -> None:
    shedder = LagShedder(TARGET_S)
    ticks(shedder, 200, lag_s=0.004, busy=1.0)  # a heavy closed-loop load: busy, on time
    assert shedder.share == 0.0
    assert admitted_of(shedder, 1000) == 1000


def test_a_late_busy_loop_refuses_a_growing_share() -> None:
    shedder = loaded()
    shares = []
    for _ in range(20):
        ticks(shedder, 1, lag_s=3 * TARGET_S, busy=1.0)
        shares.append(shedder.share)
    assert shares == sorted(shares) and shares[0] > 0
    assert shares[-1] == pytest.approx(1 - math.exp(20 * loop_lag.GAIN * (1 - 3)))


def test_a_late_but_mostly_idle_loop_refuses_nothing() -> None:
    """Held up once (a collection, a model swap) is not overloaded."""
    shedder = LagShedder(TARGET_S)
    ticks(shedder, 50, lag_s=0.0, busy=0.05)
    ticks(shedder, 1, lag_s=0.08, busy=1.0)
    ticks(shedder, 1, lag_s=0.03, busy=0.5)
    assert shedder.share == 0.0


def test_refusals_are_spread_evenly_at_the_share() -> None:
    shedder = loaded()
    while shedder.share < 0.75:
        ticks(shedder, 1, lag_s=2 * TARGET_S, busy=1.0)
    share = shedder.share
    pattern = [shedder.admit() for _ in range(1000)]
    assert abs(sum(pattern) - (1 - share) * 1000) <= 1
    longest_refused_run = max(len(run) for run in "".join("ra"[a] for a in pattern).split("a"))
    assert longest_refused_run <= math.ceil(1 / (1 - share))  # no bursts of refusals


def test_one_long_stall_counts_as_lag_cap_targets() -> None:
    shedder = loaded()
    ticks(shedder, 1, lag_s=30.0, busy=1.0)
    assert shedder.share == pytest.approx(1 - math.exp(loop_lag.GAIN * (1 - loop_lag.LAG_CAP)))


def test_the_share_falls_back_once_the_loop_is_on_time_slower_while_it_is_busy() -> None:
    idle, busy = loaded(), loaded()
    for shedder in (idle, busy):
        ticks(shedder, 30, lag_s=5 * TARGET_S, busy=1.0)
        assert shedder.share > 0.99
    ticks(idle, 30, lag_s=0.0, busy=0.0)
    ticks(busy, 30, lag_s=0.0, busy=1.0)
    assert busy.share > idle.share  # near saturation, admitting more saturates it again
    ticks(idle, 60, lag_s=0.0, busy=0.0)
    assert idle.share == 0.0  # fully open again, not asymptotically


def test_it_never_refuses_everything_for_good() -> None:
    shedder = loaded()
    ticks(shedder, 1000, lag_s=1.0, busy=1.0)
    assert 0 < admitted_of(shedder, 10_000) <= 10_000 * loop_lag.MIN_ADMITTED + 1


def test_a_few_requests_in_flight_are_admitted_however_late_the_loop() -> None:
    """Lateness with so few requests in flight comes from elsewhere (another process on
    the CPU): a client sending one request at a time is never refused."""
    shedder = loaded()
    ticks(shedder, 1000, lag_s=1.0, busy=1.0)
    assert shedder.share > 0.99 and not shedder.admit()
    for _ in range(loop_lag.MIN_IN_FLIGHT):
        shedder.leave()
    assert not shedder.crowded
    sequential = []
    for _ in range(1000):
        sequential.append(shedder.admit())
        shedder.leave()  # answered before the next one is sent
    assert sequential == [True] * 1000
    assert admitted_of(shedder, 100) == loop_lag.MIN_IN_FLIGHT  # then it is crowded
    shedder.leave()
    assert shedder.admit()  # one answered: one more may come in
    assert not shedder.admit()


def test_leaving_more_often_than_admitted_never_goes_below_zero() -> None:
    shedder = LagShedder(TARGET_S)
    shedder.leave()
    assert shedder.in_flight == 0
    assert shedder.admit() and shedder.in_flight == 1


def test_a_zero_target_is_off() -> None:
    shedder = LagShedder(0.0)
    ticks(shedder, 50, lag_s=5.0, busy=1.0)
    assert shedder.share == 0.0 and admitted_of(shedder, 100) == 100


def test_a_stalled_loop_admits_only_a_few_before_its_next_tick_runs() -> None:
    """A loop stuck on work runs no tick, so while the pending tick is overdue only the
    first STALL_ADMITS newcomers come in; once the tick has run everyone does again (the
    loop was not busy before, so one stall refuses nothing more). None of the admitted
    requests is answered here, so the shedder is crowded throughout."""
    monitor = LoopLagMonitor(TARGET_S)
    assert monitor.admit()  # not started: nothing to say
    monitor.leave()

    async def scenario() -> None:
        monitor.start()
        try:
            await asyncio.sleep(3 * TICK_S)
            assert all(monitor.admit() for _ in range(100))
            assert monitor.shedder.crowded
            stall_until = time.monotonic() + TICK_S + 4 * TARGET_S
            while time.monotonic() < stall_until:  # the loop is busy and runs no tick
                pass
            during = [monitor.admit() for _ in range(100)]
            assert during == [True] * loop_lag.STALL_ADMITS + [False] * (
                100 - loop_lag.STALL_ADMITS
            )
            await asyncio.sleep(TICK_S / 4)  # the overdue tick runs
            assert monitor.shedder.share == 0
            assert all(monitor.admit() for _ in range(100))
        finally:
            monitor.stop()

    asyncio.run(scenario())
    assert monitor.admit()  # stopped


def test_a_stalled_loop_admits_newcomers_while_few_are_in_flight() -> None:
    monitor = LoopLagMonitor(TARGET_S)

    async def scenario() -> None:
        monitor.start()
        try:
            await asyncio.sleep(3 * TICK_S)
            stall_until = time.monotonic() + TICK_S + 4 * TARGET_S
            while time.monotonic() < stall_until:
                pass
            one_at_a_time = []
            for _ in range(100):
                one_at_a_time.append(monitor.admit())
                monitor.leave()
            assert one_at_a_time == [True] * 100
        finally:
            monitor.stop()

    asyncio.run(scenario())
