"""`AuditLog.record(...)`: queue an audit entry; one writer thread chains and commits.

`record` is safe on the event loop: it takes a short lock and appends to a bounded
deque. Refusals that arrive in floods (`aggregate=True`, used for auth failures) are
counted per (action, outcome, subject, client, detail), that is by client and reason,
never by target: a client walking 20,000 distinct paths still costs one row per
`aggregate_window_s`. The row's target is the first one seen, its detail carries
`"count"` and, when the targets differed, a few of them. If the queue is
ever full the entry is dropped, counted, and the count itself is written as an
`audit.dropped` row as soon as there is room, so a loss is itself on the record.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from edgeserve.audit import chain
from edgeserve.audit.settings import AuditSettings
from edgeserve.auth.secret_files import KeyFileError
from edgeserve.config.schema import ConfigError

log = logging.getLogger(__name__)

MAX_TEXT = 200
TARGET_SAMPLES = 5  # distinct targets kept as examples in an aggregated row
MAX_DETAIL_BYTES = 4096
SECRET_KEYS = re.compile(r"token|secret|password|passwd|authorization|cookie|private|key$", re.I)
JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*\.?[A-Za-z0-9_-]*")
REDACTED = "[redacted]"

Written = Callable[[list[dict[str, Any]]], None]


def clean_text(value: Any) -> str:
    """Short, single-line, and without anything that looks like a token."""
    text = JWT_LIKE.sub(REDACTED, str(value)).replace("\n", " ").replace("\r", " ")
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def clean_detail(detail: dict[str, Any] | None) -> str:
    """Canonical JSON of `detail` with secret-named keys redacted and strings shortened."""

    def scrub(value: Any, depth: int) -> Any:
        if depth > 4:
            return "..."
        if isinstance(value, dict):
            return {
                clean_text(k): REDACTED if SECRET_KEYS.search(str(k)) else scrub(v, depth + 1)
                for k, v in list(value.items())[:32]
            }
        if isinstance(value, (list, tuple)):
            return [scrub(v, depth + 1) for v in list(value)[:32]]
        if value is None or isinstance(value, (bool, int)):
            return value
        if isinstance(value, float):
            return value if value == value and abs(value) != float("inf") else str(value)
        return clean_text(value)

    body = detail if isinstance(detail, dict) else {} if detail is None else {"value": detail}
    text = orjson.dumps(scrub(body, 0), option=orjson.OPT_SORT_KEYS).decode()
    if len(text) > MAX_DETAIL_BYTES:
        return orjson.dumps({"truncated": True, "bytes": len(text)}).decode()
    return text


class AuditLog:
    """The audit log of one server process (`app.state.audit`)."""

    def __init__(
        self,
        settings: AuditSettings,
        state_dir: Path,
        on_written: Written | None = None,
    ) -> None:
        self.settings = settings
        self.path = chain.db_path(state_dir)
        key = _load_key(state_dir)
        if key is None:
            raise ConfigError("audit", f"cannot read {chain.key_path(state_dir)}")
        self._key = key
        chain.connect(self.path).close()  # schema now, so a broken disk fails at start-up
        self._on_written = on_written
        self._lock = threading.Lock()
        self._queue: deque[dict[str, Any]] = deque()
        self._counts: dict[tuple, list] = {}  # key -> [count, first time_ms, targets, more]
        self._window_start = time.monotonic()
        self._dropped = 0
        self._flush_counts = False  # flush() asks for the aggregates now, not at window end
        self._accepted = 0
        self._written = 0
        self._written_cond = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)

    # -- any thread ------------------------------------------------------------------
    def record(
        self,
        action: str,
        target: str,
        outcome: str,
        subject: str = "",
        client: str = "",
        detail: dict[str, Any] | None = None,
        *,
        aggregate: bool = False,
    ) -> None:
        """Queue one entry. Never blocks beyond a short lock and never raises."""
        try:
            entry = {
                "time_ms": int(time.time() * 1000),
                "subject": clean_text(subject),
                "action": clean_text(action),
                "target": clean_text(target),
                "outcome": clean_text(outcome),
                "client": clean_text(client),
                "detail": clean_detail(detail),
            }
        except Exception:  # a caller's odd detail must never break its action
            log.exception("audit entry refused action=%s", action)
            return
        with self._lock:
            if aggregate:
                self._aggregate(entry)
                return
            if len(self._queue) >= self.settings.queue_entries:
                self._dropped += 1
                return
            self._queue.append(entry)
            self._accepted += 1
        self._wake.set()

    def record_refused(self, client: str, reason: str) -> None:
        """The authenticator's `on_refused(client, reason)` hook: one 401."""
        detail = {"reason": reason}
        self.record("auth.refused", "token", "denied", client=client, detail=detail, aggregate=True)

    def _aggregate(self, entry: dict[str, Any]) -> None:
        # Under self._lock. The target is not part of the key (see the module doc).
        key = tuple(entry[k] for k in ("action", "outcome", "subject", "client", "detail"))
        if key not in self._counts and len(self._counts) >= self.settings.aggregate_max_keys:
            # Too many distinct clients or reasons in one window: fold the rest into one row.
            key = (*key[:2], "", "*", '{"reason":"many distinct clients or reasons"}')
        found = self._counts.get(key)
        if found is None:
            self._counts[key] = [1, entry["time_ms"], [entry["target"]], False]
            return
        found[0] += 1
        targets = found[2]
        if entry["target"] not in targets:
            if len(targets) < TARGET_SAMPLES:
                targets.append(entry["target"])
            else:
                found[3] = True

    def _take_counts(self, force: bool) -> list[dict[str, Any]]:
        # Under self._lock.
        now = time.monotonic()
        if not self._counts or (not force and now - self._window_start < self.window_s):
            return []
        self._window_start = now
        counts, self._counts = self._counts, {}
        rows = []
        for (action, outcome, subject, client, detail), found in counts.items():
            n, first_ms, targets, more = found
            body = orjson.loads(detail)
            body["count"] = n
            if len(targets) > 1:
                body["targets"] = targets
                body["more_targets"] = more
            rows.append(
                {
                    "time_ms": first_ms,
                    "subject": subject,
                    "action": action,
                    "target": targets[0],
                    "outcome": outcome,
                    "client": client,
                    "detail": orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode(),
                }
            )
        return rows

    @property
    def window_s(self) -> float:
        return self.settings.aggregate_window_s

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every entry recorded so far (aggregates included) is committed."""
        with self._lock:
            self._flush_counts = True
            target = self._accepted + len(self._counts)
        self._wake.set()
        with self._written_cond:
            return self._written_cond.wait_for(lambda: self._written >= target, timeout_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (aggregates too), then end the writer thread."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # -- the writer thread -------------------------------------------------------------
    def _run(self) -> None:
        conn = chain.connect(self.path)
        next_prune = 0.0
        try:
            while True:
                stopping = self._stop.is_set()
                try:
                    self._write_pending(conn, force=stopping)
                except Exception:  # the writer must outlive any one bad batch
                    log.exception("audit batch lost")
                if time.monotonic() >= next_prune:
                    self._prune(conn)
                    next_prune = time.monotonic() + self.settings.prune_interval_s
                if stopping:
                    return
                self._wake.wait(self.window_s)
                self._wake.clear()
        finally:
            conn.close()

    def _write_pending(self, conn: sqlite3.Connection, force: bool) -> None:
        with self._lock:
            force = force or self._flush_counts
            self._flush_counts = False
            entries = list(self._queue)
            self._queue.clear()
            aggregated = self._take_counts(force)
            self._accepted += len(aggregated)
            dropped, self._dropped = self._dropped, 0
        if dropped:
            entries.append(
                {
                    "time_ms": int(time.time() * 1000),
                    "subject": "",
                    "action": "audit.dropped",
                    "target": "audit",
                    "outcome": "error",
                    "client": "",
                    "detail": orjson.dumps({"count": dropped}).decode(),
                }
            )
        rows = entries + aggregated
        if not rows:
            return
        try:
            stored = self._append(conn, rows)
        finally:  # written or lost (and logged): flush() must not wait for these
            with self._written_cond:
                self._written += len(entries) - (1 if dropped else 0) + len(aggregated)
                self._written_cond.notify_all()
        self._cap_size(conn)
        if stored and self._on_written is not None:
            try:
                self._on_written(stored)
            except Exception:  # forwarding (e.g. to telemetry) never stops the log
                log.exception("audit forward failed rows=%d", len(stored))

    def _append(self, conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> list[dict]:
        """Commit `rows`; on a disk error retry with backoff, until stop gives up."""
        backoff_s = 0.05
        while True:
            try:
                return chain.append(conn, self._key, rows)
            except sqlite3.Error as exc:
                log.error("audit write failed rows=%d error=%r", len(rows), str(exc))
                if self._stop.wait(backoff_s) and backoff_s >= 5.0:
                    log.error("audit writer gave up at stop rows=%d", len(rows))
                    return []
                backoff_s = min(backoff_s * 2, 5.0)

    def _cap_size(self, conn: sqlite3.Connection) -> None:
        """Prune the oldest quarter of the rows until the file is under `max_db_bytes`."""
        try:
            removed = 0
            while chain.used_bytes(conn) > self.settings.max_db_bytes:
                rows = chain.row_count(conn)
                if rows <= 1:
                    break
                removed += chain.prune_oldest(conn, self._key, max(1, rows // 4))
        except sqlite3.Error as exc:
            log.error("audit size cap failed error=%r", str(exc))
            return
        if removed:
            log.warning(
                "audit pruned early rows=%d max_db_bytes=%d (the chain restarts at its "
                "signed anchor)",
                removed,
                self.settings.max_db_bytes,
            )

    def _prune(self, conn: sqlite3.Connection) -> None:
        cutoff_ms = int((time.time() - self.settings.retention_days * 86400) * 1000)
        try:
            removed = chain.prune(conn, self._key, cutoff_ms)
        except sqlite3.Error as exc:
            log.error("audit prune failed error=%r", str(exc))
            return
        if removed:
            log.info(
                "audit pruned rows=%d older_than_days=%s", removed, self.settings.retention_days
            )

    # -- reading (any thread; its own connection) -------------------------------------
    def read(self, since_seq: int = 0, since_ms: int = 0, limit: int = 100) -> list[dict]:
        """Rows after `since_seq` and at or after `since_ms`, oldest first."""
        return read_entries(self.path, since_seq, since_ms, limit)


def read_entries(path: Path, since_seq: int = 0, since_ms: int = 0, limit: int = 100) -> list[dict]:
    conn = chain.connect(path, create=False)
    try:
        cursor = conn.execute(
            f"SELECT {', '.join(chain.FIELDS)}, hash FROM entries "
            "WHERE seq > ? AND time_ms >= ? ORDER BY seq LIMIT ?",
            (since_seq, since_ms, limit),
        )
        names = (*chain.FIELDS, "hash")
        rows = []
        for values in cursor:
            row = dict(zip(names, values, strict=True))
            row["detail"] = orjson.loads(row["detail"])
            rows.append(row)
        return rows
    finally:
        conn.close()


def record_now(
    state_dir: Path,
    action: str,
    target: str,
    outcome: str,
    subject: str = "",
    client: str = "",
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Append one entry synchronously, for commands that run without the server
    (`edgeserve update apply`, `keys rotate`). Safe beside a running server: the chain
    head is read inside the same write transaction (BEGIN IMMEDIATE)."""
    key = _load_key(state_dir)
    if key is None:
        raise ConfigError("audit", f"cannot read {chain.key_path(state_dir)}")
    entry = {
        "time_ms": int(time.time() * 1000),
        "subject": clean_text(subject),
        "action": clean_text(action),
        "target": clean_text(target),
        "outcome": clean_text(outcome),
        "client": clean_text(client),
        "detail": clean_detail(detail),
    }
    conn = chain.connect(chain.db_path(state_dir))
    try:
        return chain.append(conn, key, [entry])[0]
    finally:
        conn.close()


def _load_key(state_dir: Path) -> bytes | None:
    try:
        return chain.load_key(chain.key_path(state_dir), create=True)
    except KeyFileError as exc:
        raise ConfigError("audit", str(exc)) from None


def check_key(state_dir: Path) -> None:
    """Refuse to start (ConfigError, exit 2) on an audit key file that holds no real key."""
    try:
        chain.load_key(chain.key_path(state_dir), create=False)
    except KeyFileError as exc:
        raise ConfigError("audit", str(exc)) from None
