"""Keeping the buffer within bounds: retention by age, the size cap, forgetting a subject.

Each function runs on the writer thread (`TelemetryStore.submit`) with its connection.
The size cap drops oldest already-synced rows first (they are safe upstream), then
oldest unsynced rows of the lowest-priority table, and counts every unsynced row it
drops in the `drops` table.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

from edgeserve.telemetry.store import TABLES, TelemetryStore

CHUNK_ROWS = 2000


def database_bytes(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(f"{path}{suffix}")
    return total


def reclaim(conn: sqlite3.Connection) -> None:
    """Hand freed pages back to the file system and empty the WAL (purged data must not
    linger there)."""
    # sqlite3.execute() steps a statement once, and one step of this pragma frees one page;
    # executescript runs it to completion.
    conn.executescript("PRAGMA incremental_vacuum;")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def apply_retention(
    store: TelemetryStore, conn: sqlite3.Connection, max_age_s: float, now: float | None = None
) -> int:
    """Delete rows older than `max_age_s`; unsynced ones are counted as dropped."""
    cutoff = (now or time.time()) - max_age_s
    removed = 0
    for table in TABLES:
        lost = conn.execute(
            f"SELECT count(*) FROM {table} WHERE time < ? AND synced = 0", (cutoff,)
        ).fetchone()[0]
        cursor = conn.execute(f"DELETE FROM {table} WHERE time < ?", (cutoff,))
        removed += cursor.rowcount
        store.record_drop(conn, table, "retention", lost)
    if removed:
        reclaim(conn)
    return removed


def enforce_size_cap(store: TelemetryStore, conn: sqlite3.Connection, max_bytes: int) -> int:
    """Delete rows until the database is under 90% of `max_bytes`; returns rows deleted."""
    if database_bytes(store.path) <= max_bytes:
        return 0
    target = int(max_bytes * 0.9)
    deleted = 0
    for synced in (1, 0):
        for table in TABLES:
            while database_bytes(store.path) > target:
                rows = conn.execute(
                    f"SELECT seq FROM {table} WHERE synced = ? ORDER BY seq LIMIT ?",
                    (synced, CHUNK_ROWS),
                ).fetchall()
                if not rows:
                    break
                last = rows[-1][0]
                conn.execute(f"DELETE FROM {table} WHERE synced = ? AND seq <= ?", (synced, last))
                deleted += len(rows)
                if not synced:
                    store.record_drop(conn, table, "size_cap", len(rows))
                reclaim(conn)
    return deleted


def forget_subject(store: TelemetryStore, conn: sqlite3.Connection, subject_hash: str) -> int:
    """Delete every row of a subject and queue a forget request for upstream."""
    conn.execute("BEGIN")
    removed = 0
    for table in ("inferences", "events"):
        removed += conn.execute(
            f"DELETE FROM {table} WHERE subject_hash = ?", (subject_hash,)
        ).rowcount
    conn.execute(
        "INSERT INTO forget_requests (record_id, subject_hash, time, data_region) "
        "VALUES (?, ?, ?, ?)",
        (
            f"forget-{subject_hash}-{int(time.time() * 1000)}",
            subject_hash,
            time.time(),
            store.data_region,
        ),
    )
    conn.execute("COMMIT")
    reclaim(conn)
    return removed


def mark_synced(conn: sqlite3.Connection, table: str, seqs: list[int]) -> None:
    """Advance the cursor: called only after upstream answered 2xx for these rows."""
    conn.execute("BEGIN")
    conn.executemany(f"UPDATE {table} SET synced = 1 WHERE seq = ?", [(s,) for s in seqs])
    conn.execute("COMMIT")


def drop_counts(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    return {(t, r): n for t, r, n in conn.execute("SELECT table_name, reason, count FROM drops")}
