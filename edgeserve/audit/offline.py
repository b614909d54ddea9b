"""Audit entries for commands that change the box without the server: `update apply`,
`update rollback`, `keys rotate`, `keys rotate-signing-key`, `token create`.

They write the same hash chain as the server (`record_now` takes the chain head inside
its own write transaction, so a running server is no obstacle). The subject is the
operating-system user who ran the command; the client is "cli".
"""

from __future__ import annotations

import getpass
import sqlite3
from typing import Any

import click

from edgeserve.audit.log import record_now
from edgeserve.config.loader import ConfigError, Settings


def audit_command(
    settings: Settings,
    action: str,
    target: str,
    outcome: str,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one entry; if the log cannot be written, say so on stderr and go on (the
    command's own work is already done and must not be reported as failed)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (some containers)
        user = "unknown"
    try:
        record_now(
            settings.server.state_dir,
            action,
            target,
            outcome,
            subject=f"os:{user}",
            client="cli",
            detail=detail,
        )
    except (ConfigError, OSError, sqlite3.Error) as exc:
        click.echo(f"edgeserve: warning: not recorded in the audit log: {exc}", err=True)
