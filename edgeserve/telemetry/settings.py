"""The [telemetry] section of edgeserve.toml."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TelemetrySettings:
    """Local buffer and upstream sync. Filled in by the telemetry work (issue 6)."""

    enabled: bool = True
