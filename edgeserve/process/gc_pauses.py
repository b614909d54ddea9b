"""Keep the cyclic garbage collector's full passes out of the request path's tail latency.

CPython's full collection walks every tracked object, and most of a serving process's
objects are alive from start-up on: modules, the app, the runtimes' Python objects.
Measured with wrk on the digits model at 16 connections: 20 full collections in 15 s,
50 ms each (max 61), every one a stall of the event loop, which made the p99 (42 ms
against a 2.1 ms p50). After `gc.freeze()` of what was alive once the models had
loaded, the same full passes took about 1 ms and the p99 was 6 ms.

`HeapSettler.changed()` is called whenever the set of loaded models changes; shortly
after the last change it collects once and freezes what is left. The first settle (at
start-up) undoes any freeze and runs a full collection. Every later one (a hot swap,
a reload, while requests are being served) collects only the young generations and
freezes the survivors: a full pass walks the whole heap on the event loop, measured
at 58-325 ms under load, which crossed the admission budget (`max_queue_wait_ms`)
and refused requests with 429 during a swap (issue 22, item 9). Measured on a loaded
2-core box after four hot swaps of digits: full passes 61-105 ms, young passes 12-21 ms
(with ~126,000 objects frozen; each swap adds ~100). What a young pass
cannot reclaim is a retired model's reference cycles that were frozen earlier: only
their small Python shells, since closing a runtime drops its session (the model's
memory) whatever holds the shell; the next start collects them.

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


FULL = 2
YOUNG = 1  # generations 0 and 1: what was allocated since the last pass, not the heap


def settle(generation: int = FULL) -> int:
    """Collect up to `generation`, then freeze what is alive; returns how many are frozen.

    A full settle unfreezes first, so that cycles frozen earlier are collected too.
    """
    if generation >= FULL:
        gc.unfreeze()
    gc.collect(generation)
    gc.freeze()
    return gc.get_freeze_count()


class HeapSettler:
    """Runs `settle()` on the event loop SETTLE_DELAY_S after the last `changed()`."""

    def __init__(self, delay_s: float = SETTLE_DELAY_S) -> None:
        self._delay_s = delay_s
        self._timer: asyncio.TimerHandle | None = None
        self._thresholds = gc.get_threshold()  # put back by stop()
        self.passes: list[int] = []  # the generation each settle collected, in order

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
        generation = YOUNG if self.passes else FULL  # only the start-up pass is full
        started = time.perf_counter()
        frozen = settle(generation)
        gc.set_threshold(SERVING_GEN0_THRESHOLD, *self._thresholds[1:])
        took_ms = (time.perf_counter() - started) * 1e3
        self.passes.append(generation)
        log.info(
            "heap settled generation=%d frozen_objects=%d took_ms=%.1f", generation, frozen, took_ms
        )
