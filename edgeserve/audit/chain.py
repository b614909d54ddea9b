"""The audit log on disk: one SQLite file, rows hash-chained, checkpoints signed.

Each row stores `hash = sha256(prev_hash || canonical JSON of the row)`, where the row
includes its own `seq`; so an edited row, a deleted row or two rows swapped break the
chain at that row. Two more facts live in the `meta` table, each with an HMAC under a
per-box key (`<state_dir>/keys/audit.key`, 0600): the *anchor*, the seq and hash of
the last row removed by retention (the chain restarts from it, so pruning keeps it
verifiable), and the *head*, the seq and hash of the last row written (so rows cut off
the end are detected too). Everything here is synchronous and runs on the writer
thread or in the CLI; nothing here knows about HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from edgeserve.auth.secret_files import read_or_create_secret, read_secret
from edgeserve.config.schema import ConfigError
from updater.errors import MasterKeyError
from updater.masterkey import check_private_file

GENESIS = "0" * 64
DB_NAME = "audit.db"
KEY_NAME = "audit.key"
FIELDS = ("seq", "time_ms", "subject", "action", "target", "outcome", "client", "detail")

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY,
    time_ms INTEGER NOT NULL,
    subject TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    client TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_time ON entries (time_ms);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def db_path(state_dir: Path) -> Path:
    return Path(state_dir) / DB_NAME


def key_path(state_dir: Path) -> Path:
    return Path(state_dir) / "keys" / KEY_NAME


def connect(path: Path, *, create: bool = True) -> sqlite3.Connection:
    """WAL with synchronous=FULL: audit rows are few, and each must survive a power cut."""
    if not create and not path.exists():
        raise FileNotFoundError(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=30000")
    if create:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
        os.chmod(path, 0o600)
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA secure_delete=ON")
    return conn


def load_key(path: Path, *, create: bool) -> bytes | None:
    """The checkpoint MAC key; created (0600) on first use by the server, None if unreadable.
    A key group or others can read is refused (ConfigError), as the master key is; a key
    file of the wrong length (an empty one among them) raises KeyFileError: an empty HMAC
    key would make every checkpoint signature worthless (issue 22, item 7)."""
    try:
        check_private_file(path, "audit key file", "the power to rewrite the audit log unseen")
    except FileNotFoundError:
        pass
    except PermissionError:
        return None
    except MasterKeyError as exc:
        raise ConfigError("audit", exc.message) from None
    try:
        return read_secret(path)
    except FileNotFoundError:
        if not create:
            return None
    except PermissionError:
        return None
    return read_or_create_secret(path)


def canonical(row: dict[str, Any]) -> bytes:
    """The bytes a row's hash covers: its fields as sorted-key JSON."""
    return orjson.dumps({k: row[k] for k in FIELDS}, option=orjson.OPT_SORT_KEYS)


def link(prev_hash: str, row: dict[str, Any]) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical(row)).hexdigest()


def checkpoint_mac(key: bytes, kind: str, seq: int, digest: str) -> str:
    return hmac.new(key, f"{kind}:{seq}:{digest}".encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    mac: str


def read_checkpoint(conn: sqlite3.Connection, kind: str) -> Checkpoint | None:
    found = dict(
        conn.execute("SELECT name, value FROM meta WHERE name LIKE ?", (f"{kind}_%",)).fetchall()
    )
    if f"{kind}_seq" not in found:
        return None
    return Checkpoint(
        int(found[f"{kind}_seq"]), found.get(f"{kind}_hash", ""), found.get(f"{kind}_mac", "")
    )


def write_checkpoint(
    conn: sqlite3.Connection, key: bytes, kind: str, seq: int, digest: str
) -> None:
    """Inside the caller's transaction, so rows and checkpoint change together."""
    mac = checkpoint_mac(key, kind, seq, digest)
    conn.executemany(
        "INSERT INTO meta (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        [(f"{kind}_seq", str(seq)), (f"{kind}_hash", digest), (f"{kind}_mac", mac)],
    )


def head(conn: sqlite3.Connection) -> tuple[int, str]:
    """(seq, hash) of the newest row, else of the anchor, else genesis."""
    found = conn.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
    if found:
        return int(found[0]), str(found[1])
    anchor = read_checkpoint(conn, "anchor")
    return (anchor.seq, anchor.hash) if anchor else (0, GENESIS)


def append(
    conn: sqlite3.Connection, key: bytes, entries: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Chain and insert `entries` (fields but seq) in one transaction; the stored rows."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        seq, prev = head(conn)
        stored = []
        for entry in entries:
            seq += 1
            row = {**entry, "seq": seq}
            digest = link(prev, row)
            conn.execute(
                "INSERT INTO entries (seq, time_ms, subject, action, target, outcome, client, "
                "detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*(row[k] for k in FIELDS), prev, digest),
            )
            stored.append({**row, "prev_hash": prev, "hash": digest})
            prev = digest
        write_checkpoint(conn, key, "head", seq, prev)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return stored


def prune(conn: sqlite3.Connection, key: bytes, before_ms: int) -> int:
    """Remove the oldest rows older than `before_ms`; the last one removed becomes the
    signed anchor the chain restarts from. Only a leading run is removed, so a clock
    that jumped back never punches a hole in the middle of the chain."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        first_kept = conn.execute(
            "SELECT MIN(seq) FROM entries WHERE time_ms >= ?", (before_ms,)
        ).fetchone()[0]
        if first_kept is None:
            found = conn.execute("SELECT MAX(seq) FROM entries").fetchone()[0]
        else:
            found = conn.execute(
                "SELECT MAX(seq) FROM entries WHERE seq < ?", (first_kept,)
            ).fetchone()[0]
        return _cut(conn, key, found)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def prune_oldest(conn: sqlite3.Connection, key: bytes, rows: int) -> int:
    """Remove the `rows` oldest rows (the size cap); the last removed becomes the anchor."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute(
            "SELECT MAX(seq) FROM (SELECT seq FROM entries ORDER BY seq LIMIT ?)", (rows,)
        ).fetchone()[0]
        return _cut(conn, key, found)
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _cut(conn: sqlite3.Connection, key: bytes, through_seq: int | None) -> int:
    """Inside a write transaction that it ends: delete rows up to `through_seq` and sign
    the last one as the anchor, so the chain stays verifiable from it."""
    if through_seq is None:
        conn.execute("ROLLBACK")
        return 0
    last = conn.execute("SELECT hash FROM entries WHERE seq = ?", (through_seq,)).fetchone()[0]
    removed = conn.execute("DELETE FROM entries WHERE seq <= ?", (through_seq,)).rowcount
    write_checkpoint(conn, key, "anchor", int(through_seq), str(last))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # pruned rows do not linger in the WAL
    return removed


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database's pages in use (freed pages are reused, not counted)."""
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * size)


def row_count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])


@dataclass(frozen=True)
class ChainReport:
    """What `verify` found; `first_bad_seq` names the first row that does not check out."""

    ok: bool
    rows: int
    anchor_seq: int
    head_seq: int
    first_bad_seq: int | None = None
    problem: str = ""
    signatures_checked: bool = False


def verify(conn: sqlite3.Connection, key: bytes | None) -> ChainReport:
    """Walk the chain from the anchor; the first row whose seq, back-link or hash is off."""
    anchor = read_checkpoint(conn, "anchor")
    tip = read_checkpoint(conn, "head")
    start_seq, prev = (anchor.seq, anchor.hash) if anchor else (0, GENESIS)
    checked = key is not None

    def bad(seq: int, rows: int, last: int, problem: str) -> ChainReport:
        return ChainReport(False, rows, start_seq, last, seq, problem, checked)

    if key is not None:
        for kind, point in (("anchor", anchor), ("head", tip)):
            if point and not hmac.compare_digest(
                point.mac, checkpoint_mac(key, kind, point.seq, point.hash)
            ):
                seq = start_seq + 1 if kind == "anchor" else point.seq
                return bad(seq, 0, start_seq, f"{kind} checkpoint signature does not match")
    expected = start_seq + 1
    rows = 0
    last = start_seq
    cursor = conn.execute(f"SELECT {', '.join(FIELDS)}, prev_hash, hash FROM entries ORDER BY seq")
    for values in cursor:
        row = dict(zip((*FIELDS, "prev_hash", "hash"), values, strict=True))
        seq = row["seq"]
        if seq > expected:
            gap = f"{expected}" if seq - 1 == expected else f"{expected}..{seq - 1}"
            return bad(seq, rows, last, f"row(s) {gap} before it are missing")
        if seq < expected:
            return bad(seq, rows, last, "is older than the signed anchor")
        if row["prev_hash"] != prev:
            return bad(seq, rows, last, "does not link to the row before it (moved or removed)")
        if link(prev, row) != row["hash"]:
            return bad(seq, rows, last, "contents changed after it was written")
        prev = row["hash"]
        last = seq
        expected += 1
        rows += 1
    if tip is not None and (tip.seq != last or tip.hash != prev):
        if tip.seq > last:
            return bad(last + 1, rows, last, f"rows {last + 1}..{tip.seq} are missing at the end")
        return bad(last, rows, last, "does not match the signed head")
    return ChainReport(True, rows, start_seq, last, None, "", checked)
