"""Keep the cyclic garbage collector's full passes out of the request path's tail latency.

CPython's full collection walks every tracked object, and most of a serving process's
objects are alive from start-up on: modules, the app, the runtimes' Python objects.
Measured with wrk on the digits model at 16 connections: 20 full collections in 15 s,
50 ms each (max 61), every one a stall of the event loop, which made the p99 (42 ms
against a 2.1 ms p50). After `gc.freeze()` of what was alive once the models had
loaded, the same full passes took about 1 ms and the p99 was 6 ms.

`HeapSettler.changed()` is called whenever the set of loaded models changes; shortly
after the last change it collects once and freezes what is left. The previous freeze
is undone first, so a retired model's objects that form reference cycles are collected
rather than kept in the frozen generation forever.

It also raises the young generation's threshold while serving. CPython's default (a pass
per 700 net container allocations) ran a young pass every ~25 requests of the small
model, about 5 µs of the event loop per request in all (measured with `gc.callbacks`);
a request's objects die by reference count, so those passes found next to nothing.
`stop()` puts the thresholds back.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)

# Wait this long after the last change: loading several models settles once, not per model.
SETTLE_DELAY_S = 0.5
# Net container allocations between two young-generation passes while serving.
SERVING_GEN0_THRESHOLD = 10_000


def settle() -> int:
    """Collect everything collectable, then freeze what is alive; returns how many froze."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class HeapSettler:
    """Runs `settle()` on the event loop SETTLE_DELAY_S after the last `changed()`."""

    def __init__(self, delay_s: float = SETTLE_DELAY_S) -> None:
        self._delay_s = delay_s
        self._timer: asyncio.TimerHandle | None = None
        self._thresholds = gc.get_threshold()  # put back by stop()

    def changed(self) -> None:
        """The loaded models changed: settle once things are quiet again."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._settle)

    def stop(self) -> None:
        """Cancel a pending settle and unfreeze, so that shutdown collects normally."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gc.unfreeze()
        gc.set_threshold(*self._thresholds)

    def _settle(self) -> None:
        self._timer = None
        started = time.perf_counter()
        frozen = settle()
        gc.set_threshold(SERVING_GEN0_THRESHOLD, *self._thresholds[1:])
        took_ms = (time.perf_counter() - started) * 1e3
        log.info("heap settled frozen_objects=%d took_ms=%.0f", frozen, took_ms)
