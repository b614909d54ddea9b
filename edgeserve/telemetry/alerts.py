"""In-process alert rules over a sliding window of recent requests.

A rule fires once its value has stayed over its threshold for `for_s` seconds and
resolves when it falls back; each transition is stored (and so synced upstream),
shown as a metric, and optionally POSTed to a webhook. The window is fed by the
telemetry writer thread a batch at a time, off the request path.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from edgeserve.telemetry.records import InferenceRecord
from edgeserve.telemetry.settings import AlertSettings


@dataclass(frozen=True)
class AlertChange:
    rule: str
    state: str  # "firing" | "resolved"
    value: float
    message: str


class AlertRules:
    """Keeps the window, pending and firing rules; `evaluate` returns state changes."""

    def __init__(
        self,
        settings: AlertSettings,
        queue_fill: Callable[[], float],
        backlog_age_s: Callable[[], float],
    ) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._window: deque[tuple[float, float, bool]] = deque(maxlen=100_000)
        # Only the latency and error-rate rules read the window (both off by default):
        # without them the writer keeps no window (it cost ~0.2 us a record).
        self._windowed = bool(settings.p99_latency_ms or settings.error_rate)
        self._queue_fill = queue_fill
        self._backlog_age_s = backlog_age_s
        self._over_since: dict[str, float] = {}
        self.firing: dict[str, float] = {}

    def observe_batch(self, records: Iterable[object]) -> None:
        if not self._windowed:
            return
        with self._lock:
            for r in records:
                if type(r) is InferenceRecord and not r.shadow:
                    self._window.append((r.time_unix, r.total_s, r.status < 500))

    def note_rollback(self, model: str, reason: str) -> AlertChange:
        return AlertChange(
            "update_rolled_back", "firing", 1.0, f"model {model} was rolled back: {reason}"
        )

    def values(self, now: float) -> dict[str, tuple[float, float]]:
        """Each enabled rule's current value and threshold."""
        s = self.settings
        values: dict[str, tuple[float, float]] = {}
        with self._lock:
            cutoff = now - s.window_s
            while self._window and self._window[0][0] < cutoff:
                self._window.popleft()
            window = list(self._window)
        if window:
            if s.p99_latency_ms:
                latencies = np.fromiter((w[1] for w in window), dtype=np.float64)
                values["p99_latency"] = (
                    float(np.percentile(latencies, 99)) * 1000,
                    s.p99_latency_ms,
                )
            if s.error_rate:
                errors = sum(1 for w in window if not w[2])
                values["error_rate"] = (errors / len(window), s.error_rate)
        if s.queue_saturation:
            values["queue_saturation"] = (self._queue_fill(), s.queue_saturation)
        if s.backlog_age_s:
            values["telemetry_backlog_age"] = (self._backlog_age_s(), s.backlog_age_s)
        return values

    def evaluate(self, now: float | None = None) -> list[AlertChange]:
        now = time.time() if now is None else now
        changes = []
        for rule, (value, threshold) in self.values(now).items():
            if value > threshold:
                since = self._over_since.setdefault(rule, now)
                if rule not in self.firing and now - since >= self.settings.for_s:
                    self.firing[rule] = value
                    message = f"{rule} is {value:.4g}, over {threshold:.4g} for {now - since:.0f} s"
                    changes.append(AlertChange(rule, "firing", value, message))
                continue
            self._over_since.pop(rule, None)
            if rule in self.firing:
                del self.firing[rule]
                changes.append(
                    AlertChange(rule, "resolved", value, f"{rule} is back to {value:.4g}")
                )
        return changes
