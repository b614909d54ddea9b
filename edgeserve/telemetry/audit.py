"""The hash chain of the telemetry `audit` table: each row commits to the one before it.

This table is the upstream channel for audit entries (`Telemetry.record_audit`); the
box's authoritative, signed audit log is `edgeserve.audit` (`<state_dir>/audit.db`).

The writer thread computes `hash = sha256(prev_hash || canonical row)` as it inserts
audit rows, so a row edited or removed in the middle of the table breaks every later
link. Retention and the size cap remove the *oldest* rows only, so verification
starts from the first row still present and trusts its `prev_hash`.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass
from typing import Any

import orjson

GENESIS = "0" * 64
CHAINED = ("record_id", "action", "target", "outcome", "subject", "detail", "time", "data_region")


def link(prev_hash: str, row: dict[str, Any]) -> str:
    """The hash of one audit row given the hash of the row before it."""
    canonical = orjson.dumps([prev_hash, *(row[k] for k in CHAINED)])
    return hashlib.sha256(canonical).hexdigest()


def last_hash(conn: sqlite3.Connection) -> str:
    found = conn.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return found[0] if found else GENESIS


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    rows: int
    first_bad_seq: int | None = None


def verify(conn: sqlite3.Connection) -> ChainReport:
    """Recompute every link; the first row whose hash or back-link does not match."""
    cursor = conn.execute(
        f"SELECT seq, prev_hash, hash, {', '.join(CHAINED)} FROM audit ORDER BY seq"
    )
    names = ["seq", "prev_hash", "hash", *CHAINED]
    previous: str | None = None
    rows = 0
    for values in cursor:
        row = dict(zip(names, values, strict=True))
        rows += 1
        if previous is not None and row["prev_hash"] != previous:
            return ChainReport(False, rows, row["seq"])
        if link(row["prev_hash"], row) != row["hash"]:
            return ChainReport(False, rows, row["seq"])
        previous = row["hash"]
    return ChainReport(True, rows)
