"""How late the event loop runs, and the share of inference requests refused to keep it
on time: the admission signal for a loop saturated by requests.

For a small model the event loop, not the runtime, is what saturates first: requests
then wait for it in socket buffers, where no queue of ours sees them. A timer every
TICK_S measures how late the loop runs it. `LagShedder` turns that lateness into the
share of new inference requests the HTTP front door refuses (edgeserve/http/shedding.py):
a refusal written from the HTTP parser costs a fraction of serving one, so refusing the
right share keeps the loop near its target and what it admits is answered in time.

Why a share and not a threshold: a loop that refuses everything while it is late and
admits everything once it is not swings between the two every tick, and each tick's
admitted burst is the next tick's lateness. Under uvloop a saturated loop also keeps
reading ready sockets (libuv polls again while a poll fills its event buffer) before it
runs timers or callbacks, so once saturated its admitted requests wait for seconds.
The admitted share moves by a factor per tick, up while the loop runs on time and down
while it runs late, so it settles where the loop keeps up, whether that is half the
requests or one in a hundred.

Lateness is blamed on requests only while MIN_IN_FLIGHT or more admitted ones are being
answered: a loop late with fewer was held up by something else (a scrape storm, another
process), and refusing the few would make it no sooner.
"""

from __future__ import annotations

import asyncio
import math
import time

# What a request refused to keep the loop on time is told (HTTP 429, gRPC RESOURCE_EXHAUSTED).
SERVER_BUSY_MESSAGE = "the server is too busy to answer in time; retry later"
TICK_S = 0.02
# Per late tick the admitted share is multiplied by exp(GAIN * (1 - lateness in targets)),
# x0.41 at LAG_CAP targets late or more (one long stall counts no more than that), but
# only while the loop's own CPU use (a moving average) is above BUSY_LATE: a loop that is
# late but mostly idle was held up once (a collection, a model swap), not overloaded.
# Per on-time tick the share is multiplied by exp(GAIN) = x1.1, or by exp(GAIN_BUSY) =
# x1.02 while the CPU use is above BUSY: lateness only shows once the loop is saturated,
# and admitting more at the speed it recovers from an idle loop saturates it again.
GAIN = 0.1
GAIN_BUSY = 0.02
BUSY_LATE = 0.5
BUSY = 0.85
LAG_CAP = 10.0
MIN_ADMITTED = 0.001
# Weight of one tick's CPU use in the loop's busy average, per second the tick spans.
BUSY_WEIGHT_PER_S = 3.0
# While the pending tick is this many targets overdue (the loop is stuck on work and runs
# no tick to say so) only the first STALL_ADMITS newcomers may come in until it has run:
# a flood that starts at once would otherwise all be admitted before the first late tick.
STALL_TARGETS = 2.0
STALL_ADMITS = 32
# A newcomer is admitted however late the loop runs while fewer than this many admitted
# requests are still being answered: so few cannot be what makes the loop late (another
# process on the CPU, a collection, a writer thread can), refusing them would make it no
# sooner, and a client that sends one request at a time must never be refused.
MIN_IN_FLIGHT = 4

_lag_s = 0.0  # how late the last tick ran; one event loop per process
_running: LoopLagMonitor | None = None  # the monitor between start() and stop()


def lag_s() -> float:
    """How late the event loop ran its last lag tick, in seconds (0 when not monitored)."""
    return _lag_s


def crowded() -> bool:
    """Whether enough admitted requests are being answered that the loop's lateness can
    be blamed on them (False when not monitored): the one rule the front door and the
    batcher both refuse by."""
    return _running is not None and _running.shedder.crowded


def in_flight() -> int:
    """Inference requests the front door has admitted and not yet answered (0 when not
    monitored): 1 while a request is being answered alone."""
    return _running.shedder.in_flight if _running is not None else 0


class LagShedder:
    """The share of new inference requests to refuse so that the loop runs at most about
    `target_s` late; pure (fed lateness samples), so it is tested without a loop.

    `admit` spreads refusals evenly (a running credit, not a coin): at a share of 0.75
    exactly one request in four is admitted. What it admits counts as in flight until
    `leave`, like a semaphore's acquire and release: each True is paired with one leave.
    """

    def __init__(self, target_s: float) -> None:
        self.target_s = target_s
        self.busy = 0.0  # moving average of the loop thread's CPU use, 0..1
        self.in_flight = 0  # admitted and not yet left
        self._admitted = 1.0
        self._credit = 0.0

    def observe(self, lag_s: float, busy: float, span_s: float) -> None:
        """Move the refused share by one tick: how late it ran, and which share of the
        `span_s` since the last tick the loop's thread spent on the CPU."""
        if self.target_s <= 0:
            return
        self.busy += min(1.0, BUSY_WEIGHT_PER_S * span_s) * (busy - self.busy)
        late = lag_s / self.target_s
        if late > 1.0:
            gain = GAIN * (1.0 - min(late, LAG_CAP)) if self.busy > BUSY_LATE else 0.0
        else:
            gain = GAIN_BUSY if self.busy > BUSY else GAIN
        self._admitted = min(1.0, max(MIN_ADMITTED, self._admitted * math.exp(gain)))

    @property
    def share(self) -> float:
        """The share of newcomers refused now, 0..1."""
        return 1.0 - self._admitted

    @property
    def crowded(self) -> bool:
        """Whether enough requests are in flight for refusing newcomers to help."""
        return self.in_flight >= MIN_IN_FLIGHT

    def admit(self) -> bool:
        """Whether the next inference request may come in (then in flight until
        `leave`): always while not `crowded`, else at the admitted share."""
        if self.crowded and self._admitted < 1.0:
            self._credit += self._admitted
            if self._credit < 1.0:
                return False
            self._credit -= 1.0
        self.in_flight += 1
        return True

    def leave(self) -> None:
        """An admitted request has been answered, or abandoned."""
        self.in_flight = max(0, self.in_flight - 1)


class LoopLagMonitor:
    """Runs the lag tick on the current event loop from start() until stop(), feeds each
    tick to `shedder`, and answers the front door's `admit` and `leave`."""

    def __init__(self, target_s: float = 0.0) -> None:
        self.shedder = LagShedder(target_s)
        self._handle: asyncio.TimerHandle | None = None
        # When the pending tick is due (monotonic clock), and the loop thread's CPU time
        # and the clock when it was scheduled.
        self._due_s = 0.0
        self._cpu_s = 0.0
        self._at_s = 0.0
        self._stalled_admits = 0  # asked since the pending tick became overdue

    def start(self) -> None:
        global _running
        self._schedule(asyncio.get_running_loop())
        _running = self

    def stop(self) -> None:
        global _lag_s, _running
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        _lag_s = 0.0
        if _running is self:
            _running = None
        self.shedder = LagShedder(self.shedder.target_s)

    def admit(self) -> bool:
        """Whether the next inference request may come in (then in flight until
        `leave`): as the shedder says, except that while the pending tick is overdue
        and the shedder is crowded only the first STALL_ADMITS newcomers may."""
        target_s = self.shedder.target_s
        if (
            target_s > 0
            and self._handle is not None
            and self.shedder.crowded
            and time.monotonic() - self._due_s > STALL_TARGETS * target_s
        ):
            self._stalled_admits += 1
            if self._stalled_admits > STALL_ADMITS:
                return False
        return self.shedder.admit()

    def leave(self) -> None:
        """An admitted request has been answered, or abandoned."""
        self.shedder.leave()

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        self._cpu_s = time.thread_time()  # this runs on the loop's thread
        self._at_s = time.monotonic()
        self._due_s = self._at_s + TICK_S
        self._handle = loop.call_later(TICK_S, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        global _lag_s
        now_s = time.monotonic()
        _lag_s = max(0.0, now_s - self._due_s)
        span_s = max(now_s - self._at_s, 1e-6)
        busy = (time.thread_time() - self._cpu_s) / span_s
        self.shedder.observe(_lag_s, min(1.0, busy), span_s)
        self._stalled_admits = 0
        self._schedule(loop)
