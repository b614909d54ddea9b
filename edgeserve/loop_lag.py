"""How late the event loop runs: the admission signal for a loop saturated by requests.

For a small model the event loop, not the runtime, is what saturates first: requests
then wait for it in socket buffers, where no queue of ours sees them. A timer every
TICK_S measures how late the loop runs it, and the dynamic batcher refuses while that
lag is over its wait budget, so that a refusal (written from the HTTP parser, a few µs)
replaces work the loop cannot do in time.
"""

from __future__ import annotations

import asyncio

TICK_S = 0.02

_lag_s = 0.0  # how late the last tick ran; one event loop per process


def lag_s() -> float:
    """How late the event loop ran its last lag tick, in seconds (0 when not monitored)."""
    return _lag_s


class LoopLagMonitor:
    """Runs the lag tick on the current event loop from start() until stop()."""

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._schedule(asyncio.get_running_loop())

    def stop(self) -> None:
        global _lag_s
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        _lag_s = 0.0

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        due = loop.time() + TICK_S
        self._handle = loop.call_at(due, self._tick, loop, due)

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        global _lag_s
        _lag_s = max(0.0, loop.time() - due)
        self._schedule(loop)
