"""Who may label a request, and how often: ground truth is what experiments decide on.

One label per request id: the first one stands and a later one is refused (409), so one
client cannot outvote the others by repeating itself. A caller may label only the
requests its own token subject made, unless its token holds scope `feedback` (a
labelling service; `admin` implies it). The checks run on the telemetry writer thread,
after every record accepted before them is committed, so the inference being labelled
and every earlier label are already in SQLite.
"""

from __future__ import annotations

import sqlite3

from edgeserve.errors import Conflict, EdgeserveError, Forbidden, NotFound


def label_refusal(
    conn: sqlite3.Connection, request_id: str, owner_hash: str | None
) -> EdgeserveError | None:
    """Why `request_id` may not be labelled now by `owner_hash` (None: by any caller);
    None when it may."""
    made, foreign = conn.execute(
        "SELECT count(*), coalesce(sum(owner_hash IS NOT ?), 0) FROM inferences "
        "WHERE request_id = ?",
        (owner_hash, request_id),
    ).fetchone()
    if not made:
        return NotFound(f"no inference with request id {request_id!r} to label")
    if owner_hash is not None and foreign:
        return Forbidden(
            f"request {request_id!r} was made by another caller; labelling other callers' "
            "requests needs scope 'feedback'"
        )
    if conn.execute(
        "SELECT 1 FROM feedback WHERE request_id = ? LIMIT 1", (request_id,)
    ).fetchone():
        return Conflict(f"request {request_id!r} is already labelled; the first label stands")
    return None
