"""In-process alert rules over a sliding window of recent requests.

A rule fires when its value crosses its threshold and resolves when it falls back;
each transition is stored (and so synced upstream), shown as a metric, and optionally
POSTed to a webhook.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgeserve.telemetry.settings import AlertSettings


@dataclass(frozen=True)
class AlertChange:
    rule: str
    state: str  # "firing" | "resolved"
    value: float
    message: str


class AlertRules:
    """Keeps the window and the firing set; `evaluate` returns state changes."""

    def __init__(
        self,
        settings: AlertSettings,
        queue_fill: Callable[[], float],
        backlog_age_s: Callable[[], float],
    ) -> None:
        self.settings = settings
        self._window: deque[tuple[float, float, bool]] = deque(maxlen=100_000)
        self._queue_fill = queue_fill
        self._backlog_age_s = backlog_age_s
        self.firing: dict[str, float] = {}

    def observe(self, total_s: float, ok: bool) -> None:
        self._window.append((time.monotonic(), total_s, ok))

    def note_rollback(self, model: str, reason: str) -> AlertChange:
        return AlertChange(
            "update_rolled_back", "firing", 1.0, f"model {model} was rolled back: {reason}"
        )

    def evaluate(self) -> list[AlertChange]:
        s = self.settings
        cutoff = time.monotonic() - s.window_s
        while self._window and self._window[0][0] < cutoff:
            self._window.popleft()
        values: dict[str, tuple[float, float]] = {}  # rule -> (value, threshold)
        if self._window:
            latencies = np.fromiter((w[1] for w in self._window), dtype=np.float64)
            errors = sum(1 for w in self._window if not w[2])
            if s.p99_latency_ms:
                values["p99_latency"] = (
                    float(np.percentile(latencies, 99)) * 1000,
                    s.p99_latency_ms,
                )
            if s.error_rate:
                values["error_rate"] = (errors / len(self._window), s.error_rate)
        if s.queue_saturation:
            values["queue_saturation"] = (self._queue_fill(), s.queue_saturation)
        if s.backlog_age_s:
            values["telemetry_backlog_age"] = (self._backlog_age_s(), s.backlog_age_s)
        changes = []
        for rule, (value, threshold) in values.items():
            if value > threshold and rule not in self.firing:
                self.firing[rule] = value
                changes.append(
                    AlertChange(
                        rule, "firing", value, f"{rule} is {value:.4g}, over {threshold:.4g}"
                    )
                )
            elif value <= threshold and rule in self.firing:
                del self.firing[rule]
                changes.append(
                    AlertChange(rule, "resolved", value, f"{rule} is back to {value:.4g}")
                )
        return changes
