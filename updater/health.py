"""The health watch over a version on probation: wait, confirm, or roll back, and why.

Pure: the server feeds it each request's outcome, compute time per row, rows and
caller, and asks for a verdict with a monotonic clock reading; nothing here sleeps,
reads a clock or does IO. Before the window ends a breach counts only once
`min_requests` were seen (a single early error is noise); at the end of the window
whatever was seen is judged.

Speed is judged on comparable work, so that one caller cannot steer a rollback (issue
18: one 15 x 1 MiB request among 49 small ones crossed a 50-sample p99):
- per row of compute, not per request, and against the previous version's per-row
  compute when it is known (`max_slowdown`);
- requests whose rows are batch-size outliers (over `BATCH_OUTLIER_FACTOR` times the
  median) are left out;
- only once `min_subjects` distinct callers were seen, and each caller has one vote:
  the figure judged is the median over callers of each caller's p99.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from typing import Literal

BATCH_OUTLIER_FACTOR = 4.0  # rows over this times the median: not judged on speed
MAX_SUBJECTS = 1024  # distinct callers remembered (a vote each); more share the last


@dataclass(frozen=True)
class HealthPolicy:
    """Thresholds from `[updater]`: watch_window_s, min_requests, max_error_rate, max_p99_ms."""

    watch_window_s: float = 300.0
    min_requests: int = 50
    max_error_rate: float = 0.05
    max_p99_ms: float = 1000.0  # per row of compute
    min_subjects: int = 3  # distinct callers before speed is judged
    max_slowdown: float = 3.0  # per-row compute over the previous version's, times


@dataclass(frozen=True)
class Verdict:
    action: Literal["wait", "confirm", "rollback"]
    reason: str


class HealthWatch:
    """Outcomes of one version since its flip; not thread-safe (feed it from one place)."""

    def __init__(
        self,
        policy: HealthPolicy,
        started_s: float,
        max_latencies: int = 10_000,
        baseline_row_ms: float | None = None,
    ) -> None:
        self.policy = policy
        self.started_s = started_s
        self.baseline_row_ms = baseline_row_ms  # the previous version's, if it was measured
        self.requests = 0
        self.errors = 0
        self.probe_failure: str | None = None
        self._latencies: list[tuple[float, int, int]] = []  # (ms per row, rows, caller)
        self._subjects: dict[str, int] = {}
        self._cap = max_latencies
        self._random = random.Random(0)

    def observe(self, ok: bool, row_ms: float, rows: int = 1, subject: str = "") -> None:
        """One request served by the version under watch: its compute time per row, its
        rows and who sent it (failed requests count as errors, not as speed)."""
        self.requests += 1
        self.errors += not ok
        if not ok:
            return
        caller = self._subjects.setdefault(subject, min(len(self._subjects), MAX_SUBJECTS))
        sample = (row_ms, max(1, rows), caller)
        if len(self._latencies) < self._cap:
            self._latencies.append(sample)
        else:  # reservoir sampling keeps memory bounded and the p99 unbiased
            slot = self._random.randrange(self.requests)
            if slot < self._cap:
                self._latencies[slot] = sample

    def probe_failed(self, reason: str) -> None:
        """A validation probe (the manifest's samples, re-run live) failed."""
        self.probe_failure = reason

    def p99_ms(self) -> float | None:
        """p99 of per-row compute over all samples (shown in the status)."""
        return _p99([ms for ms, _, _ in self._latencies])

    def comparable_row_ms(self) -> tuple[float, float, int, int] | None:
        """(median over callers of each caller's p99 and of each caller's median per-row
        compute, callers, requests) over the requests that are not batch-size outliers;
        None without samples."""
        if not self._latencies:
            return None
        limit = BATCH_OUTLIER_FACTOR * statistics.median(rows for _, rows, _ in self._latencies)
        by_caller: dict[int, list[float]] = {}
        kept = 0
        for ms, rows, caller in self._latencies:
            if rows <= limit:
                by_caller.setdefault(caller, []).append(ms)
                kept += 1
        p99s = [_p99(samples) or 0.0 for samples in by_caller.values()]
        medians = [statistics.median(samples) for samples in by_caller.values()]
        return statistics.median(p99s), statistics.median(medians), len(p99s), kept

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
            speed = self._speed_breach()
            if speed is not None:
                return Verdict("rollback", speed)
        if not ended:
            return Verdict("wait", f"{self.requests} requests seen, window still open")
        return Verdict(
            "confirm",
            f"healthy over {p.watch_window_s:.0f} s: {self.requests} requests, "
            f"{self.errors} errors, p99 {self.p99_ms() or 0.0:.1f} ms per row",
        )

    def _speed_breach(self) -> str | None:
        """Why the version is too slow on comparable work, or None (also when too few
        callers were seen to judge: one caller cannot decide for everyone)."""
        p = self.policy
        found = self.comparable_row_ms()
        if found is None:
            return None
        p99_ms, median_ms, callers, kept = found
        if callers < p.min_subjects:
            return None
        seen = f"({kept} comparable requests from {callers} callers)"
        if p99_ms > p.max_p99_ms:
            return f"p99 latency {p99_ms:.2f} ms per row over {p.max_p99_ms:g} ms {seen}"
        base = self.baseline_row_ms
        if base and median_ms > base * p.max_slowdown:  # typical against typical
            return (
                f"median compute {median_ms:.3f} ms per row is {median_ms / base:.1f}x the "
                f"previous version's {base:.3f} ms (over {p.max_slowdown:g}x) {seen}"
            )
        return None


def _p99(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
