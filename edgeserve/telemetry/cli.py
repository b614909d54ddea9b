"""`edgeserve telemetry ...`: look at the local buffer and forget a subject.

These commands work on `<state_dir>/telemetry.db` directly, so they run whether or
not the server is up (SQLite's locking keeps the two writers apart).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import click

from edgeserve.cli.options import CONFIG_OPTION, JSON_OPTION, load_or_exit
from edgeserve.config.loader import Settings
from edgeserve.telemetry import maintenance
from edgeserve.telemetry.service import hash_subject
from edgeserve.telemetry.store import LOCAL_ONLY, TABLES, connect


def _open(settings: Settings) -> sqlite3.Connection:
    path = settings.server.state_dir / "telemetry.db"
    if not path.exists():
        click.echo(f"edgeserve: no telemetry buffer at {path}", err=True)
        raise SystemExit(1)
    return connect(path)


def _emit(doc: dict[str, Any], as_json: bool, text: str) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True) if as_json else text)


@click.group("telemetry")
def telemetry() -> None:
    """The local telemetry buffer: its status, and forgetting a subject.

    Example: edgeserve telemetry status --config /etc/edgeserve/edgeserve.toml
    """


@telemetry.command()
@click.argument("subject")
@click.option("--hashed", is_flag=True, help="SUBJECT is already the stored subject hash.")
@CONFIG_OPTION
@JSON_OPTION
def forget(subject: str, hashed: bool, config_path: Path | None, as_json: bool) -> None:
    """Delete every row about SUBJECT here and queue a forget request for upstream.

    SUBJECT is the id the application sent (its keyed hash is what is stored).

    Example: edgeserve telemetry forget alice@example.com --config edgeserve.toml
    """
    settings = load_or_exit(config_path)
    if hashed:
        digest = subject
    else:
        key_path = settings.server.state_dir / "keys" / "subject.key"
        if not key_path.exists():  # no key: no subject was ever recorded on this box
            _emit({"removed_rows": 0}, as_json, "nothing recorded for any subject on this box")
            return
        digest = hash_subject(key_path.read_bytes(), subject)
    conn = _open(settings)
    try:
        removed = maintenance.forget_subject_rows(conn, digest, settings.telemetry.data_region)
    finally:
        conn.close()
    _emit(
        {"removed_rows": removed, "subject_hash": digest},
        as_json,
        f"removed {removed} rows of subject {digest}; the forget request will go upstream",
    )


@telemetry.command()
@CONFIG_OPTION
@JSON_OPTION
def status(config_path: Path | None, as_json: bool) -> None:
    """Rows per table, how many await upstream, drops and the size against the cap.

    Example: edgeserve telemetry status --json
    """
    settings = load_or_exit(config_path)
    conn = _open(settings)
    try:
        doc = buffer_status(conn, settings.server.state_dir / "telemetry.db")
    finally:
        conn.close()
    doc["max_db_bytes"] = settings.telemetry.max_db_bytes
    doc["data_region"] = settings.telemetry.data_region
    lines = [f"{'table':<16} {'rows':>10} {'unsynced':>10}"]
    lines += [f"{t:<16} {v['rows']:>10} {v['unsynced']:>10}" for t, v in doc["tables"].items()]
    lines.append(f"size: {doc['db_bytes']} of {doc['max_db_bytes']} bytes")
    lines.append(f"oldest unsynced: {doc['oldest_unsynced_age_s']:.0f} s ago")
    lines += [f"dropped {k}: {n}" for k, n in doc["dropped"].items()]
    _emit(doc, as_json, "\n".join(lines))


def buffer_status(conn: sqlite3.Connection, path: Path) -> dict[str, Any]:
    tables: dict[str, dict[str, int]] = {}
    oldest: float | None = None
    for table in TABLES:
        rows, unsynced, first = conn.execute(
            f"SELECT count(*), coalesce(sum(synced = 0), 0), min(CASE WHEN synced = 0 "
            f"THEN time END) FROM {table}"
        ).fetchone()
        tables[table] = {"rows": rows, "unsynced": 0 if table in LOCAL_ONLY else unsynced}
        if first is not None and table not in LOCAL_ONLY:
            oldest = first if oldest is None else min(oldest, first)
    return {
        "tables": tables,
        "dropped": {f"{t}/{r}": n for (t, r), n in maintenance.drop_counts(conn).items()},
        "db_bytes": maintenance.database_bytes(path),
        "oldest_unsynced_age_s": 0.0 if oldest is None else max(0.0, time.time() - oldest),
    }
