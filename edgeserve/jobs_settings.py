"""The [jobs] section of edgeserve.toml: background batch jobs and streaming."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class JobSettings:
    """Async batch jobs on the server (issue 8)."""

    enabled: bool = True
