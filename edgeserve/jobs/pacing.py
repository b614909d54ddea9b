"""When may the job thread score its next chunk? Live requests come first.

Two rules, checked before every chunk:
1. Duty cycle: if live requests were served since the previous chunk, pause so that
   the job uses at most `busy_share` of the time (a chunk of t seconds is followed
   by t * (1 / busy_share - 1) seconds of rest). On a quiet box the job runs flat out.
2. Idle queue: wait until no live request is queued or running, but at most
   `max_wait_s`, so that a box that is never idle still finishes its jobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_PAUSE_S = 0.25


@dataclass
class LiveSignals:
    """What the pacer can see of live traffic (from the registry)."""

    queue_depth: Callable[[], int]  # requests waiting or running now
    served: Callable[[], int]  # requests answered so far (any counter that grows)


class LivePacer:
    def __init__(
        self,
        live: LiveSignals,
        busy_share: float,
        poll_s: float,
        max_wait_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self._live = live
        self._share = busy_share
        self._poll_s = poll_s
        self._max_wait_s = max_wait_s
        self._clock = clock
        self._sleep = sleep
        self._chunk_started: float | None = None
        self._served = -1

    def before_chunk(self, should_stop: Callable[[], bool]) -> bool:
        """Block until the next chunk may run; False when `should_stop` says so."""
        now = self._clock()
        served = self._safe(self._live.served, self._served)
        if self._chunk_started is not None and served != self._served and self._share < 1.0:
            spent = now - self._chunk_started
            self._rest(min(spent * (1.0 / self._share - 1.0), MAX_PAUSE_S), should_stop)
        self._served = served
        deadline = self._clock() + self._max_wait_s
        while True:
            if should_stop():
                return False
            if self._safe(self._live.queue_depth, 1) == 0 or self._clock() > deadline:
                self._chunk_started = self._clock()
                return True
            self._sleep(self._poll_s)

    def _rest(self, seconds: float, should_stop: Callable[[], bool]) -> None:
        until = self._clock() + seconds
        while not should_stop() and self._clock() < until:
            self._sleep(min(self._poll_s * 5, until - self._clock()))

    @staticmethod
    def _safe(read: Callable[[], int], fallback: int) -> int:
        try:
            return read()
        except RuntimeError:  # the registry changed while it was being read
            return fallback
