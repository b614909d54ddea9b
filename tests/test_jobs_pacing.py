"""The job pacer: full speed on a quiet box, a bounded share of time beside live traffic."""

from __future__ import annotations

from edgeserve.jobs.pacing import MAX_PAUSE_S, LivePacer, LiveSignals


class FakeBox:
    """A clock that only moves when someone sleeps, and live traffic we script."""

    def __init__(self) -> None:
        self.now = 0.0
        self.depth = 0
        self.served = 0
        self.slept = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds

    def pacer(self, share: float = 0.25, max_wait_s: float = 0.5) -> LivePacer:
        signals = LiveSignals(lambda: self.depth, lambda: self.served)
        return LivePacer(signals, share, 0.002, max_wait_s, lambda: self.now, self.sleep)


def never() -> bool:
    return False


def test_a_quiet_box_runs_chunks_back_to_back() -> None:
    box = FakeBox()
    pacer = box.pacer()
    for _ in range(5):
        assert pacer.before_chunk(never)
        box.now += 0.010  # the chunk's work
    assert box.slept == 0.0


def test_with_live_traffic_the_job_rests_three_times_its_chunk_at_a_quarter_share() -> None:
    box = FakeBox()
    pacer = box.pacer(share=0.25)
    assert pacer.before_chunk(never)
    box.now += 0.010
    box.served += 3  # live requests were answered during that chunk
    assert pacer.before_chunk(never)
    assert abs(box.slept - 0.030) < 1e-6


def test_rest_is_capped_so_a_slow_chunk_does_not_stall_the_job_for_long() -> None:
    box = FakeBox()
    pacer = box.pacer(share=0.01)
    pacer.before_chunk(never)
    box.now += 2.0
    box.served += 1
    pacer.before_chunk(never)
    assert box.slept <= MAX_PAUSE_S + 1e-6


def test_a_busy_queue_delays_the_chunk_but_not_forever() -> None:
    box = FakeBox()
    box.depth = 4  # never idle
    pacer = box.pacer(max_wait_s=0.5)
    assert pacer.before_chunk(never)
    assert 0.5 <= box.slept < 0.51


def test_stop_is_honoured_while_waiting() -> None:
    box = FakeBox()
    box.depth = 1
    calls = iter([False, False, True])
    assert not box.pacer().before_chunk(lambda: next(calls))
