"""Token buckets per key (a client address, a token subject), answering 429 with Retry-After.

Used twice by the authenticator: failed authentications per client address, taken only
once a token has been refused, so that a flood of bad or missing tokens from an address
gets a cheap 429 while a valid token from that same address is still served; and
requests per token subject, so one caller cannot take the whole box. Each bucket
refills at `rate_per_s` up to `burst`. Memory is bounded: past `max_keys` the least
recently used key is forgotten.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import NoReturn

from edgeserve.errors import Overloaded


class TokenBucketLimiter:
    """Per-key token buckets; `burst == 0` turns the limiter off."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        what: str = "requests",
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.what = what
        self.max_keys = max_keys
        self.clock = clock
        # Read on every request a token passes: an attribute, not a property (burst is
        # fixed for the limiter's life).
        self.enabled = burst > 0
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at
        self._lock = threading.Lock()

    def check(self, key: str) -> None:
        """Raise Overloaded (429, Retry-After) if `key` has no token left; spend nothing."""
        if not self.enabled:
            return
        with self._lock:
            entry = self._buckets.get(key)
            tokens = float(self.burst) if entry is None else self._refilled(entry)
        if tokens < 1.0:
            self._refuse(tokens)

    def spend(self, key: str) -> None:
        """Take one token from `key`'s bucket (never below zero), without refusing."""
        if self.enabled:
            with self._lock:
                self._put(key, max(0.0, self._tokens(key) - 1.0))

    def take(self, key: str) -> None:
        """Take one token, or raise Overloaded if there is none."""
        if not self.enabled:
            return
        with self._lock:
            tokens = self._tokens(key)
            self._put(key, tokens - 1.0 if tokens >= 1.0 else tokens)
        if tokens < 1.0:
            self._refuse(tokens)

    def _tokens(self, key: str) -> float:
        entry = self._buckets.pop(key, None)
        return float(self.burst) if entry is None else self._refilled(entry)

    def _put(self, key: str, tokens: float) -> None:
        self._buckets[key] = (tokens, self.clock())
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def _refilled(self, entry: tuple[float, float]) -> float:
        tokens, at = entry
        return min(float(self.burst), tokens + (self.clock() - at) * self.rate_per_s)

    def _refuse(self, tokens: float) -> NoReturn:
        retry_after_s = max(1, math.ceil((1.0 - tokens) / self.rate_per_s))
        raise Overloaded(
            f"too many {self.what}; retry later", headers={"Retry-After": str(retry_after_s)}
        )
