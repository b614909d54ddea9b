"""The [updater] section of edgeserve.toml (kept in edgeserve: `updater` never imports it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UpdaterSettings:
    """Trusted keys, limits and health watch for model updates (issue 5)."""

    enabled: bool = True
