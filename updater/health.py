"""The health watch over a version on probation: wait, confirm, or roll back, and why.

Pure: the server feeds it each request's outcome and latency and asks for a verdict
with a monotonic clock reading; nothing here sleeps, reads a clock or does IO.
Before the window ends a breach counts only once `min_requests` were seen (a single
early error is noise); at the end of the window whatever was seen is judged.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class HealthPolicy:
    """Thresholds from `[updater]`: watch_window_s, min_requests, max_error_rate, max_p99_ms."""

    watch_window_s: float = 300.0
    min_requests: int = 50
    max_error_rate: float = 0.05
    max_p99_ms: float = 1000.0


@dataclass(frozen=True)
class Verdict:
    action: Literal["wait", "confirm", "rollback"]
    reason: str


class HealthWatch:
    """Outcomes of one version since its flip; not thread-safe (feed it from one place)."""

    def __init__(self, policy: HealthPolicy, started_s: float, max_latencies: int = 10_000) -> None:
        self.policy = policy
        self.started_s = started_s
        self.requests = 0
        self.errors = 0
        self.probe_failure: str | None = None
        self._latencies: list[float] = []
        self._cap = max_latencies
        self._random = random.Random(0)

    def observe(self, ok: bool, latency_ms: float) -> None:
        """One request served by the version under watch."""
        self.requests += 1
        self.errors += not ok
        if len(self._latencies) < self._cap:
            self._latencies.append(latency_ms)
        else:  # reservoir sampling keeps memory bounded and the p99 unbiased
            slot = self._random.randrange(self.requests)
            if slot < self._cap:
                self._latencies[slot] = latency_ms

    def probe_failed(self, reason: str) -> None:
        """A validation probe (the manifest's samples, re-run live) failed."""
        self.probe_failure = reason

    def p99_ms(self) -> float | None:
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    def verdict(self, now_s: float) -> Verdict:
        """What to do now; a `rollback` reason is meant for the journal's history."""
        p = self.policy
        if self.probe_failure is not None:
            return Verdict("rollback", f"validation probe failed: {self.probe_failure}")
        ended = now_s - self.started_s >= p.watch_window_s
        if self.requests and (ended or self.requests >= p.min_requests):
            rate = self.errors / self.requests
            if rate > p.max_error_rate:
                return Verdict(
                    "rollback",
                    f"error rate {rate:.1%} over {p.max_error_rate:.1%} "
                    f"({self.errors} of {self.requests} requests)",
                )
            p99 = self.p99_ms()
            if p99 is not None and p99 > p.max_p99_ms:
                return Verdict(
                    "rollback",
                    f"p99 latency {p99:.1f} ms over {p.max_p99_ms:.1f} ms "
                    f"({self.requests} requests)",
                )
        if not ended:
            return Verdict("wait", f"{self.requests} requests seen, window still open")
        return Verdict(
            "confirm",
            f"healthy over {p.watch_window_s:.0f} s: {self.requests} requests, "
            f"{self.errors} errors, p99 {self.p99_ms() or 0.0:.1f} ms",
        )
