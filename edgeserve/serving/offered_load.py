"""How many rows a model is offered per second, refused ones included: the sign that it
is overloaded rather than merely busy.

A long queue can mean two things. A fixed set of clients that each wait for their
answer (a closed loop) keeps the queue as long as the clients are many, and offers no
more than the model computes: refusing some of them frees nobody, since they send again
at once. Clients that send on their own schedule (an open loop) can offer more than the
model computes: then the queue only grows, and each request admitted to its tail waits
the longest. The difference shows in the offered rate against the model's speed, which
is what `OfferedLoad` estimates (pure; the caller passes the clock).
"""

from __future__ import annotations

import math

# The estimate forgets with this time constant: long enough to average a closed loop's
# bursts (a batch of answers, then as many new requests at once; 32 clients arriving
# together read as 128 rows/s), short enough that 4x a model's speed is seen in ~0.1 s.
TIME_CONSTANT_S = 0.25
# Offered rows/s beyond this many times what the model computes is overload: a closed
# loop offers at most about 1x, and the estimate's noise stays well inside this margin.
OVERLOAD_FACTOR = 1.5


class OfferedLoad:
    """An exponentially decaying rate of offered rows (rows/s)."""

    def __init__(self) -> None:
        self._rate = 0.0
        self._at = 0.0

    def offer(self, rows: int, now: float) -> None:
        """Count `rows` offered at `now` (seconds, any monotonic clock)."""
        self._rate = self.rate(now) + rows / TIME_CONSTANT_S
        self._at = now

    def rate(self, now: float) -> float:
        """The offered rows per second as of `now`."""
        if self._rate == 0.0:
            return 0.0
        return self._rate * math.exp(-(now - self._at) / TIME_CONSTANT_S)

    def exceeds(self, rows_per_s: float, now: float) -> bool:
        """Whether more than OVERLOAD_FACTOR times `rows_per_s` is offered."""
        return rows_per_s > 0 and self.rate(now) > OVERLOAD_FACTOR * rows_per_s
