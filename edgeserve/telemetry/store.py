"""The local telemetry buffer: SQLite in WAL mode, written by one thread in batches.

Durability: `synchronous=FULL` in WAL mode makes every committed batch survive a
process kill *and* a power cut; a batch is committed at most `write_interval_ms`
after its first record was queued. `durable_seq` is the highest record sequence
number known to be committed: every record with a sequence at or below it is on
disk. Records still in the in-memory queue when the process dies are lost; records
that find the queue full are dropped and counted, never waited for.

All writes (inserts, marking rows synced, purges) happen on the writer thread, so
SQLite never sees two writers; readers (the sync task, reports) use their own
connections, which WAL lets run beside the writer.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import astuple
from pathlib import Path
from typing import Any

import sqlite_utils

from edgeserve.telemetry.records import EventRecord, FeedbackRecord, InferenceRecord

log = logging.getLogger(__name__)

# Lowest priority first: when the size cap bites, unsynced rows go in this order.
TABLES = ("inferences", "events", "feedback", "alerts", "forget_requests")

_COLUMNS: dict[str, dict[str, type]] = {
    "inferences": {
        "request_id": str,
        "model": str,
        "version": str,
        "status": int,
        "total_s": float,
        "queue_s": float,
        "compute_s": float,
        "batch_size": int,
        "time": float,
        "experiment": str,
        "variant": str,
        "top_score": float,
        "subject_hash": str,
        "shadow": int,
        "error": str,
        "prediction": str,
    },
    "feedback": {"request_id": str, "label": str, "correct": int, "time": float},
    "events": {"name": str, "value": float, "subject_hash": str, "time": float},
    "alerts": {"rule": str, "state": str, "value": float, "message": str, "time": float},
    "forget_requests": {"subject_hash": str, "time": float},
}
_RECORD_TABLE = {InferenceRecord: "inferences", FeedbackRecord: "feedback", EventRecord: "events"}


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def create_schema(path: Path) -> None:
    """Tables, indexes and incremental auto-vacuum (set before the first table exists)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db = sqlite_utils.Database(conn)
        for table, columns in _COLUMNS.items():
            db[table].create(  # type: ignore[union-attr]
                {"seq": int, "record_id": str, **columns, "data_region": str, "synced": int},
                pk="seq",
                if_not_exists=True,
                defaults={"synced": 0},
            )
            db[table].create_index(["synced", "seq"], if_not_exists=True)  # type: ignore[union-attr]
        if "prediction" not in db["inferences"].columns_dict:  # a buffer from before 0.1
            db["inferences"].add_column("prediction", str)  # type: ignore[union-attr]
        db["inferences"].create_index(["experiment", "variant"], if_not_exists=True)  # type: ignore[union-attr]
        db["inferences"].create_index(["subject_hash"], if_not_exists=True)  # type: ignore[union-attr]
        db["inferences"].create_index(["request_id"], if_not_exists=True)  # type: ignore[union-attr]
        db["drops"].create(
            {"table_name": str, "reason": str, "count": int},  # type: ignore[union-attr]
            pk=("table_name", "reason"),
            if_not_exists=True,
        )
    finally:
        conn.close()


class TelemetryStore:
    """Bounded queue in front of one writer thread that owns every SQLite write."""

    def __init__(
        self,
        path: Path,
        data_region: str,
        queue_records: int,
        batch_records: int,
        interval_s: float,
        on_drop: Callable[[str, str, int], None] | None = None,
    ) -> None:
        self.path = path
        self.data_region = data_region
        self.batch_records = batch_records
        self.interval_s = interval_s
        self._on_drop = on_drop or (lambda table, reason, n: None)
        self._queue: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=queue_records)
        self._commands: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], Future]] = (
            queue.SimpleQueue()
        )
        self._boot = secrets.token_hex(4)
        self._seq = 0
        self._seq_lock = threading.Lock()
        self.durable_seq = 0
        self._last_queued = 0
        self.dropped = 0
        self._stop = threading.Event()
        path.parent.mkdir(parents=True, exist_ok=True)
        create_schema(path)
        os.chmod(path, 0o600)
        self._thread = threading.Thread(target=self._run, name="telemetry-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, record: Any) -> int:
        """Queue a record; its sequence number, or 0 when the queue is full (dropped)."""
        with self._seq_lock:
            self._seq += 1
            seq = self._seq
        try:
            self._queue.put_nowait((seq, record))
        except queue.Full:
            self.dropped += 1
            self._on_drop(_RECORD_TABLE.get(type(record), "other"), "queue_full", 1)
            return 0
        self._last_queued = seq
        return seq

    def backlog_in_memory(self) -> int:
        return self._queue.qsize()

    def submit(self, command: Callable[[sqlite3.Connection], Any]) -> Future:
        """Run `command(conn)` on the writer thread, after the records queued before it."""
        future: Future = Future()
        self._commands.put((command, future))
        return future

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued so far is committed."""
        target = self._last_queued
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.durable_seq >= target:
                return True
            time.sleep(0.005)
        return False

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        conn = connect(self.path)
        try:
            while True:
                batch = self._take_batch()
                if batch:
                    self._write(conn, batch)
                self._run_commands(conn)
                if self._stop.is_set() and self._queue.empty():
                    break
        finally:
            conn.close()

    def _take_batch(self) -> list[tuple[int, Any]]:
        try:
            first = self._queue.get(timeout=self.interval_s)
        except queue.Empty:
            return []
        batch = [first]
        while len(batch) < self.batch_records:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write(self, conn: sqlite3.Connection, batch: list[tuple[int, Any]]) -> None:
        rows: dict[str, list[tuple]] = {}
        for seq, record in batch:
            table = _RECORD_TABLE[type(record)]
            values = astuple(record)  # fields are declared in column order
            rows.setdefault(table, []).append((f"{self._boot}-{seq}", *values, self.data_region))
        try:
            conn.execute("BEGIN")
            for table, values in rows.items():
                names = ["record_id", *_COLUMNS[table], "data_region"]
                sql = (
                    f"INSERT INTO {table} ({', '.join(names)}) "
                    f"VALUES ({', '.join('?' * len(names))})"
                )
                conn.executemany(sql, values)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("telemetry write failed records=%d error=%r", len(batch), str(exc))
            self.record_drop(conn, "inferences", "write_error", len(batch))
            self.durable_seq = batch[-1][0]  # lost, counted; nothing later waits for them
            return
        self.durable_seq = batch[-1][0]

    def _run_commands(self, conn: sqlite3.Connection) -> None:
        while True:
            try:
                command, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(command(conn))
            except Exception as exc:  # handed to the caller, who logs it
                future.set_exception(exc)

    def record_drop(self, conn: sqlite3.Connection, table: str, reason: str, count: int) -> None:
        if count <= 0:
            return
        conn.execute(
            "INSERT INTO drops (table_name, reason, count) VALUES (?, ?, ?) "
            "ON CONFLICT (table_name, reason) DO UPDATE SET count = count + excluded.count",
            (table, reason, count),
        )
        self._on_drop(table, reason, count)
