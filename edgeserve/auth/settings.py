"""The [auth] section of edgeserve.toml."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AuthSettings:
    """How callers prove who they are. Filled in by the auth work (issue 4)."""

    enabled: bool = False
