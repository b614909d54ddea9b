"""Keeping the buffer within bounds: retention by age, the size cap, forgetting a subject.

Each function runs on the writer thread (`TelemetryStore.submit`) with its connection,
so it never races the inserts; serving is never blocked (requests only append to the
in-memory queue), and the size cap works in bounded steps so batches keep flowing
between them. The size cap drops oldest already-synced rows first (they are safe
upstream), then oldest unsynced rows of the lowest-priority table (`TABLES` order:
kept payloads, inferences, events, feedback, alerts, forget requests, audit), and counts every
unsynced row it drops in the `drops` table, in the same transaction as the delete.
Freed pages go back to the file system with `incremental_vacuum` and the WAL is
truncated, so purged rows (zeroed by `secure_delete`) do not linger in either.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path

from edgeserve.telemetry.store import (
    BUSY_TIMEOUT_MS,
    CHECKPOINT_WAIT_MS,
    LOCAL_ONLY,
    SYNCED_TABLES,
    TABLES,
    WAL_LIMIT_BYTES,
    TelemetryStore,
)

SYNCED, UNSYNCED, REJECTED = 1, 0, 2  # the `synced` column: acknowledged, not yet, refused
MARK_ROWS = 64  # rows marked synced per transaction
CAP_TRIGGER = 0.95  # files over 95% of the cap start a trim ...
CAP_TARGET = 0.9  # ... down to 90% of it, so the cap is not hit again at once
CAP_STEP = 0.03  # one delete removes at most 3% of a table's rows ...
CAP_STEP_MIN_ROWS = 16  # ... or this many, whichever is more
# The database and its WAL stay within max_db_bytes * (1 + CAP_MARGIN): the WAL has a
# budget of a tenth of the cap (store.wal_budget), eviction checkpoints after every step.
CAP_MARGIN = 0.25


def wal_budget(max_bytes: int) -> int:
    """The WAL's share of the margin over the cap (at most the store's usual 8 MiB)."""
    return max(16 * 1024, min(WAL_LIMIT_BYTES, max_bytes // 10))


def database_bytes(path: Path) -> int:
    """The database and its WAL: what the cap is about."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += os.path.getsize(f"{path}{suffix}")
    return total


def over_trigger(path: Path, max_bytes: int) -> bool:
    """Whether the files are over CAP_TRIGGER of the cap (a stat call: after every batch)."""
    return database_bytes(path) > max_bytes * CAP_TRIGGER


def reclaim(conn: sqlite3.Connection, wal_budget_bytes: int = WAL_LIMIT_BYTES) -> None:
    """Hand freed pages back to the file system and empty the WAL. Vacuum moves pages,
    and every page moved is written to the WAL: in steps of a quarter of its budget,
    each checkpointed, so the WAL never holds a whole vacuum."""
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    step = max(8, wal_budget_bytes // page // 4)
    while conn.execute("PRAGMA freelist_count").fetchone()[0]:
        # sqlite3.execute() steps a statement once, and one step of this pragma frees one
        # page; executescript runs it to completion.
        conn.executescript(f"PRAGMA incremental_vacuum({step});")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
    # TRUNCATE waits for readers to leave the WAL; a long report query must not stall the
    # writer for the full busy timeout; a later reclaim finishes the job.
    conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


def apply_retention(
    store: TelemetryStore,
    conn: sqlite3.Connection,
    max_age_s: float | dict[str, float],
    now: float | None = None,
) -> int:
    """Delete rows older than their table's `max_age_s`, except rows on the wire to the
    collector; unsynced ones count as dropped."""
    removed = 0
    for table in TABLES:
        age = max_age_s if isinstance(max_age_s, (int, float)) else max_age_s.get(table)
        if age is None:
            continue
        cutoff = (now or time.time()) - age
        old = f"time < ? {_not_on_the_wire(store, table)}"
        conn.execute("BEGIN IMMEDIATE")
        lost = (
            0  # local-only rows were never meant to leave: their age limit is not a loss
            if table in LOCAL_ONLY
            else conn.execute(
                f"SELECT count(*) FROM {table} WHERE {old} AND synced = 0", (cutoff,)
            ).fetchone()[0]
        )
        removed += conn.execute(f"DELETE FROM {table} WHERE {old}", (cutoff,)).rowcount
        store.record_drop(conn, table, "retention", lost)
        conn.execute("COMMIT")
    if removed:
        prune_dead_letters(conn)
        reclaim(conn, store.wal_budget_bytes)
    return removed


def _not_on_the_wire(store: TelemetryStore, table: str) -> str:
    """A condition passing over the rows of `table` on the wire to the collector: their
    2xx may be on its way (the next retention pass takes them if it never comes). The
    seqs are integers read from the table itself, so they are inlined safely."""
    seqs = store.sending.get(table)
    if not seqs:
        return ""
    return f"AND seq NOT IN ({', '.join(str(int(q)) for q in sorted(seqs))})"


def used_bytes(conn: sqlite3.Connection) -> int:
    """Pages holding data: what deleting rows shrinks, whatever readers keep the WAL from
    being truncated (measuring the files instead could delete far more than needed)."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return (pages - free) * conn.execute("PRAGMA page_size").fetchone()[0]


def enforce_size_cap(
    store: TelemetryStore, conn: sqlite3.Connection, max_bytes: int, max_chunks: int = 1_000_000
) -> int:
    """When the files exceed CAP_TRIGGER of `max_bytes`, delete rows, oldest first in the
    stated order (synced, then rejected, then unsynced by table priority, passing over
    rows on the wire to the collector), until the data fits in
    `CAP_TARGET` of it. Each step deletes about as many rows as the excess takes, and
    at most `CAP_STEP` of the table, then checkpoints, so a trim never empties the
    buffer and the WAL never holds a whole purge. At most `max_chunks` steps per call;
    rows deleted (0 = nothing (more) to do)."""
    if not over_trigger(store.path, max_bytes):
        return 0
    target = int(max_bytes * CAP_TARGET)
    deleted = chunks = 0
    all_rows = sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES)
    per_row = max(1.0, used_bytes(conn) / max(1, all_rows))  # pages a row holds, on average
    for synced in (SYNCED, REJECTED, UNSYNCED):
        for table in TABLES:
            while chunks < max_chunks:
                used = used_bytes(conn)
                if used <= target:
                    break
                # Rows on the wire are passed over: their 2xx may be on its way.
                skip = store.sending.get(table, frozenset()) if synced == UNSYNCED else frozenset()
                rows = _rows_for(conn, table, synced, (used - target) / per_row, len(skip))
                if not rows:
                    break
                conn.execute("BEGIN IMMEDIATE")
                found = conn.execute(
                    f"SELECT seq FROM {table} WHERE synced = ? ORDER BY seq LIMIT ?",
                    (synced, rows + len(skip)),
                ).fetchall()
                seqs = [seq for (seq,) in found if seq not in skip][:rows]
                if seqs and not skip:
                    conn.execute(
                        f"DELETE FROM {table} WHERE synced = ? AND seq <= ?", (synced, seqs[-1])
                    )
                elif seqs:
                    conn.executemany(f"DELETE FROM {table} WHERE seq = ?", [(q,) for q in seqs])
                if seqs and synced == UNSYNCED:
                    store.record_drop(conn, table, "size_cap", len(seqs))
                conn.execute("COMMIT")
                deleted += len(seqs)
                chunks += 1
                # Each step's deletes leave the WAL at once (PASSIVE: never waits for a
                # reader; the last step's TRUNCATE below does).
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                if not seqs:
                    break
    prune_dead_letters(conn)
    reclaim(conn, store.wal_budget_bytes)  # give the freed pages back, truncate the WAL
    return deleted


def _rows_for(
    conn: sqlite3.Connection, table: str, synced: int, excess_rows: float, passed_over: int
) -> int:
    """Rows of `table` in this `synced` state to delete: the excess in average rows, at
    most CAP_STEP of those rows, none of the `passed_over` ones (0 = none to delete)."""
    present = conn.execute(f"SELECT count(*) FROM {table} WHERE synced = ?", (synced,))
    count = present.fetchone()[0] - passed_over
    if count <= 0:
        return 0
    step = max(CAP_STEP_MIN_ROWS, int(count * CAP_STEP))
    return min(count, int(excess_rows) + 1, step)


def forget_subject(store: TelemetryStore, conn: sqlite3.Connection, subject_hash: str) -> int:
    """Delete every row of a subject and queue a forget request for upstream."""
    return forget_subject_rows(conn, subject_hash, store.data_region)


def forget_subject_rows(conn: sqlite3.Connection, subject_hash: str, data_region: str) -> int:
    """The same on any connection (the CLI works on the file while the server may run)."""
    conn.execute("BEGIN IMMEDIATE")
    # Ground truth and kept payloads of the subject's requests are about the subject too.
    # A request is the subject's whether the subject header, the token (owner) or an
    # experiment's unit (a user id header or claim) named them. One lookup per column,
    # each through its partial index (an OR of the three would read every inference).
    theirs = " UNION ".join(
        f"SELECT seq FROM inferences WHERE {column} = :subject"
        for column in ("subject_hash", "owner_hash", "unit_hash")
    )
    key = {"subject": subject_hash}
    removed = 0
    for table in ("feedback", "payloads"):
        removed += conn.execute(
            f"DELETE FROM {table} WHERE request_id IN "
            f"(SELECT request_id FROM inferences WHERE seq IN ({theirs}))",
            key,
        ).rowcount
    removed += conn.execute(f"DELETE FROM inferences WHERE seq IN ({theirs})", key).rowcount
    removed += conn.execute("DELETE FROM events WHERE subject_hash = ?", (subject_hash,)).rowcount
    now = time.time()
    conn.execute(
        "INSERT INTO forget_requests (record_id, subject_hash, time, data_region) "
        "VALUES (?, ?, ?, ?)",
        (f"forget-{subject_hash}-{int(now * 1000)}", subject_hash, now, data_region),
    )
    prune_dead_letters(conn)
    conn.execute("COMMIT")
    reclaim(conn)
    return removed


def dead_letter(
    store: TelemetryStore,
    conn: sqlite3.Connection,
    table: str,
    row: tuple[int, str],
    status: int,
    max_records: int,
) -> bool:
    """Mark a record the collector refused for good as rejected (never synced), list it
    in `dead_letters` and count it dropped (`upstream_rejected`), once: a row already
    gone (evicted, forgotten) was counted by what removed it. Beyond `max_records` the
    oldest dead letters and their rows go (already counted). Whether it was marked."""
    seq, record_id = row
    conn.execute("BEGIN IMMEDIATE")
    marked = conn.execute(
        f"UPDATE {table} SET synced = {REJECTED} WHERE seq = ? AND synced = {UNSYNCED}", (seq,)
    ).rowcount
    if marked:
        conn.execute(
            "INSERT INTO dead_letters (table_name, record_seq, record_id, status, time) "
            "VALUES (?, ?, ?, ?, ?)",
            (table, seq, record_id, status, time.time()),
        )
        store.record_drop(conn, table, "upstream_rejected", 1)
        over = dead_letter_count(conn) - max_records
        if over > 0:
            oldest = conn.execute(
                "SELECT id, table_name, record_seq FROM dead_letters ORDER BY id LIMIT ?", (over,)
            ).fetchall()
            for _, name, record_seq in oldest:
                conn.execute(
                    f"DELETE FROM {name} WHERE seq = ? AND synced = {REJECTED}", (record_seq,)
                )
            conn.execute("DELETE FROM dead_letters WHERE id <= ?", (oldest[-1][0],))
    conn.execute("COMMIT")
    return bool(marked)


def dead_letter_count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]


def prune_dead_letters(conn: sqlite3.Connection) -> None:
    """Forget dead letters whose rows are gone (retention, the size cap, forget)."""
    for table in SYNCED_TABLES:
        conn.execute(
            "DELETE FROM dead_letters WHERE table_name = ? AND record_seq NOT IN "
            f"(SELECT seq FROM {table} WHERE synced = {REJECTED})",
            (table,),
        )


def mark_synced(conn: sqlite3.Connection, table: str, seqs: list[int]) -> None:
    """Advance the cursor: called only after upstream answered 2xx for these rows. In
    transactions of MARK_ROWS, each followed by a checkpoint, so that marking a large
    upload does not pile its pages up in the WAL beyond the cap's margin."""
    for start in range(0, len(seqs), MARK_ROWS):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            f"UPDATE {table} SET synced = {SYNCED} WHERE seq = ? AND synced = {UNSYNCED}",
            [(s,) for s in seqs[start : start + MARK_ROWS]],
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


def drop_counts(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    return {(t, r): n for t, r, n in conn.execute("SELECT table_name, reason, count FROM drops")}


def count_unsynced(conn: sqlite3.Connection) -> int:
    return sum(
        conn.execute(f"SELECT count(*) FROM {table} WHERE synced = 0").fetchone()[0]
        for table in SYNCED_TABLES
    )
