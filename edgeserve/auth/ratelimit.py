"""Slow down token guessing: a token bucket of failed authentications per client address.

Each failure takes one token from the client's bucket, which refills at `rate_per_s` up
to `burst`. An empty bucket answers 429 with Retry-After before the token is even parsed,
so a flood of bad tokens costs the box almost nothing. Memory is bounded: past
`max_clients` the least recently failing address is forgotten.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from edgeserve.errors import Overloaded


class FailedAuthLimiter:
    """Per-address budget of failed authentications; `burst == 0` turns it off."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.burst > 0

    def check(self, client: str) -> None:
        """Raise Overloaded (429, Retry-After) if `client` has used up its failures."""
        if not self.enabled:
            return
        with self._lock:
            entry = self._buckets.get(client)
            if entry is None:
                return
            tokens = self._refilled(entry)
        if tokens < 1.0:
            retry_after_s = max(1, math.ceil((1.0 - tokens) / self.rate_per_s))
            raise Overloaded(
                "too many failed authentications from this address; retry later",
                headers={"Retry-After": str(retry_after_s)},
            )

    def record_failure(self, client: str) -> None:
        """Take one token from `client`'s bucket."""
        if not self.enabled:
            return
        with self._lock:
            entry = self._buckets.pop(client, None)
            tokens = float(self.burst) if entry is None else self._refilled(entry)
            self._buckets[client] = (max(0.0, tokens - 1.0), self.clock())
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)

    def _refilled(self, entry: tuple[float, float]) -> float:
        tokens, at = entry
        return min(float(self.burst), tokens + (self.clock() - at) * self.rate_per_s)
