"""The local telemetry buffer: SQLite in WAL mode, written by one thread in batches.

Durability, precisely: `add()` gives each accepted record a sequence number; numbers
are handed out and queued under one lock, so the queue is in sequence order and the
writer commits batches in that order. `durable_seq` is the last sequence number of
the last committed batch: every accepted record with a sequence number at or below
it is in the database file (unless SQLite refused its values as malformed, which is
counted as a `write_error` drop). With `synchronous=FULL` in WAL mode the WAL is
fsynced at every commit, so that holds across a process kill *and* a power cut;
NORMAL would survive only a process kill. One fsync per batch (at most one batch
per `write_interval_ms` under load) is cheap. Records still in memory when the
process dies are lost; records that find the queue full are dropped and counted.

Which process: sequence numbers restart at 1 in every process, so a number alone vouches
for nothing after a restart. Each process start is a row of `boots` (its random boot id,
persisted before any record is numbered), and its `durable_seq` is updated in the same
transaction as every batch it commits. A client that kept only `x-telemetry-seq:
<boot>-<seq>` (the record's id) checks `durable[<boot>] >= seq` in the status; the marks of
the last `MAX_BOOTS` processes are kept, so a record lost with an earlier process is never
vouched for by a later one.

Checkpoints: the WAL has a budget (`wal_budget_bytes`: a tenth of the size cap, at most
8 MiB). The writer's automatic checkpoint runs at half of it, `journal_size_limit`
truncates the WAL back to it, a write chunk holds no more rows than fit in half of it
(estimated from the WAL's growth per row), and a WAL found over it after a commit is
checkpointed and truncated at once; purges end with `wal_checkpoint(TRUNCATE)` so deleted
rows do not linger there. So the files stay within the cap plus `CAP_MARGIN`.

All writes (inserts, marking rows synced, purges) happen on the writer thread, so
SQLite never sees two writers in this process; readers (the sync task, reports,
the CLI) use their own connections, which WAL lets run beside the writer.
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator
import os
import secrets
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import fields
from pathlib import Path
from typing import Any

from edgeserve.process.thread_names import name_this_thread
from edgeserve.telemetry import audit
from edgeserve.telemetry.records import (
    INFERENCE_TEXT_FIELDS,
    MAX_INFERENCE_TEXT_CHARS,
    AlertRecord,
    AuditRecord,
    EventRecord,
    FeedbackRecord,
    InferenceRecord,
    PayloadRecord,
)


def _import_sqlite_utils() -> Any:
    """sqlite-utils, without the pandas import it does whenever pandas is installed (the
    `spark` extra installs it) only to map `pandas.Timestamp` to TEXT, which edgeserve
    never stores: 0.3-1 s of CPU at every command and server start on a small box.
    pandas stays importable afterwards; only sqlite-utils' optional reference is empty."""
    if "pandas" in sys.modules:
        import sqlite_utils

        return sqlite_utils
    sys.modules["pandas"] = None  # type: ignore[assignment]  # ImportError inside
    try:
        import sqlite_utils
    finally:
        del sys.modules["pandas"]
    return sqlite_utils


sqlite_utils = _import_sqlite_utils()

log = logging.getLogger(__name__)

# Lowest priority first: when the size cap bites, unsynced rows go in this order.
TABLES = ("payloads", "inferences", "events", "feedback", "alerts", "forget_requests", "audit")
LOCAL_ONLY = frozenset({"payloads"})  # never sent upstream
SYNCED_TABLES = tuple(t for t in TABLES if t not in LOCAL_ONLY)
WAL_LIMIT_BYTES = 8 * 1024 * 1024
BUSY_TIMEOUT_MS = 30_000
CHECKPOINT_WAIT_MS = 1000  # a checkpoint waits this long for readers, then is retried later
MAX_BOOTS = 64  # processes whose durable marks the status can still show
WRITER_THREAD_NAME = "es-telemetry"  # the writer thread's name for the kernel (top -H)

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
        "owner_hash": str,
        "unit_hash": str,
    },
    "payloads": {
        "request_id": str,
        "model": str,
        "version": str,
        "nonce": bytes,
        "ciphertext": bytes,
        "time": float,
    },
    "feedback": {"request_id": str, "label": str, "correct": int, "time": float},
    "events": {"name": str, "value": float, "subject_hash": str, "time": float},
    "alerts": {"rule": str, "state": str, "value": float, "message": str, "time": float},
    "forget_requests": {"subject_hash": str, "time": float},
    "audit": {
        "action": str,
        "target": str,
        "outcome": str,
        "subject": str,
        "detail": str,
        "time": float,
    },
}
_EXTRA = {"audit": {"prev_hash": str, "hash": str}}
AUDIT_NAMES = ("record_id", *_COLUMNS["audit"], "data_region")
RECORD_TABLE: dict[type, str] = {
    InferenceRecord: "inferences",
    FeedbackRecord: "feedback",
    EventRecord: "events",
    AlertRecord: "alerts",
    AuditRecord: "audit",
    PayloadRecord: "payloads",
}
# dataclasses.astuple deep-copies (about 10 us a record); attrgetter is ~30x cheaper.
# An InferenceRecord is a tuple already: its values are itself.
_VALUES = {
    cls: operator.attrgetter(*(f.name for f in fields(cls)))
    for cls in RECORD_TABLE
    if cls is not InferenceRecord
}


def connect(path: Path, wal_budget_bytes: int = WAL_LIMIT_BYTES) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute(f"PRAGMA journal_size_limit={int(wal_budget_bytes)}")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.execute(f"PRAGMA wal_autocheckpoint={max(8, int(wal_budget_bytes) // (2 * page))}")
    return conn


def wal_bytes(path: Path) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except OSError:
        return 0


def create_schema(path: Path) -> None:
    """Tables, indexes and incremental auto-vacuum (set before the first table exists)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        db = sqlite_utils.Database(conn)
        for table, columns in _COLUMNS.items():
            db[table].create(  # type: ignore[union-attr]
                {
                    "seq": int,
                    "record_id": str,
                    **columns,
                    "data_region": str,
                    **_EXTRA.get(table, {}),
                    "synced": int,
                },
                pk="seq",
                if_not_exists=True,
                defaults={"synced": 0},
            )
            db[table].create_index(["synced", "seq"], if_not_exists=True)  # type: ignore[union-attr]
        # Columns added since 0.1 (prediction), 0.2 (owner_hash), 0.3 (unit_hash): a buffer
        # written before gets them here.
        present = db["inferences"].columns_dict
        for column in ("prediction", "owner_hash", "unit_hash"):
            if column not in present:
                db["inferences"].add_column(column, str)  # type: ignore[union-attr]
        for name, sql in PARTIAL_INDEXES.items():
            _ensure_index(conn, name, sql)
        db["inferences"].create_index(["request_id"], if_not_exists=True)  # type: ignore[union-attr]
        db["payloads"].create_index(["request_id"], if_not_exists=True)  # type: ignore[union-attr]
        db["feedback"].create_index(["request_id"], if_not_exists=True)  # type: ignore[union-attr]
        db["events"].create_index(["subject_hash"], if_not_exists=True)  # type: ignore[union-attr]
        db["dead_letters"].create(  # type: ignore[union-attr]
            {
                "id": int,
                "table_name": str,
                "record_seq": int,
                "record_id": str,
                "status": int,
                "time": float,
            },
            pk="id",
            if_not_exists=True,
        )
        _ensure_boots(conn)
        db["drops"].create(
            {"table_name": str, "reason": str, "count": int},  # type: ignore[union-attr]
            pk=("table_name", "reason"),
            if_not_exists=True,
        )
    finally:
        conn.close()


# Most inferences have no experiment and no subject: an index entry for each of those
# NULL rows cost about a fifth of an insert (0.8 of 4.5 us a row here). The readers look
# these columns up with "= ?", which implies NOT NULL, so SQLite uses the partial index.
PARTIAL_INDEXES = {
    "idx_inferences_experiment_variant": (
        "CREATE INDEX idx_inferences_experiment_variant ON inferences (experiment, variant) "
        "WHERE experiment IS NOT NULL"
    ),
    "idx_inferences_subject_hash": (
        "CREATE INDEX idx_inferences_subject_hash ON inferences (subject_hash) "
        "WHERE subject_hash IS NOT NULL"
    ),
    # forget looks a subject up by owner and by unit too, holding the writer: without
    # these it read every inference.
    "idx_inferences_owner_hash": (
        "CREATE INDEX idx_inferences_owner_hash ON inferences (owner_hash) "
        "WHERE owner_hash IS NOT NULL"
    ),
    "idx_inferences_unit_hash": (
        "CREATE INDEX idx_inferences_unit_hash ON inferences (unit_hash) "
        "WHERE unit_hash IS NOT NULL"
    ),
}


BOOTS_SQL = (
    "CREATE TABLE boots (n INTEGER PRIMARY KEY AUTOINCREMENT, boot_id TEXT NOT NULL UNIQUE, "
    "started FLOAT, durable_seq INTEGER)"
)


def _ensure_boots(conn: sqlite3.Connection) -> None:
    """The `boots` table, numbered in registration order (`n`, never reused): which
    processes are the newest must not depend on their clocks. A buffer from before it
    (ordered by `started`) is converted, its rows numbered in their old order."""
    found = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'boots'")
    current = found.fetchone()
    if current is not None and current[0] == BOOTS_SQL:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if current is None:
            conn.execute(BOOTS_SQL)
        else:
            conn.execute("ALTER TABLE boots RENAME TO boots_before_n")
            conn.execute(BOOTS_SQL)
            conn.execute(
                "INSERT INTO boots (boot_id, started, durable_seq) SELECT boot_id, started, "
                "durable_seq FROM boots_before_n ORDER BY started, rowid"
            )
            conn.execute("DROP TABLE boots_before_n")
        conn.execute("COMMIT")
    except sqlite3.Error:
        conn.execute("ROLLBACK")
        raise


def _ensure_index(conn: sqlite3.Connection, name: str, sql: str) -> None:
    """Create index `name` as `sql`, replacing one of that name defined otherwise (the
    full indexes of buffers written before they were partial)."""
    row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (name,))
    current = row.fetchone()
    if current is not None and current[0] == sql:
        return
    if current is not None:
        conn.execute(f"DROP INDEX {name}")
    conn.execute(sql)


def quarantine(path: Path) -> Path:
    """Move an unreadable database (and its WAL and shared memory) aside for a post-mortem,
    so the box keeps recording instead of refusing to start."""
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, f"{aside}{suffix}")
    return aside


def count_unsynced_salvaged(path: Path) -> dict[str, int] | None:
    """Unsynced rows per table of a quarantined buffer, read past a damaged schema
    (`writable_schema` makes SQLite skip entries it cannot parse); a table that cannot be
    read is left out; None when nothing can be read at all."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return None
    counts: dict[str, int] = {}
    try:
        conn.execute("PRAGMA writable_schema=ON")
        for table in SYNCED_TABLES:
            try:
                row = conn.execute(f"SELECT count(*) FROM {table} WHERE synced = 0").fetchone()
            except sqlite3.Error:
                continue
            counts[table] = row[0]
    except sqlite3.Error:
        return None
    finally:
        conn.close()
    return counts or None


def _approx_bytes(record: Any) -> int:
    """About what a record's row stores: its text and bytes, and 8 bytes per number (a
    malformed record, refused later by `_write`, counts as a small row)."""
    if type(record) is InferenceRecord:  # 8 bytes a field, plus the text: read in C
        try:
            return _INFERENCE_FIXED_BYTES + sum(map(len, filter(None, _INFERENCE_TEXT(record))))
        except TypeError:  # text that is not text
            return 256
    getter = _VALUES.get(type(record))
    if getter is None:
        return 256
    return 64 + sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in getter(record))


_INFERENCE_TEXT = operator.itemgetter(*INFERENCE_TEXT_FIELDS)
_RECORD = operator.itemgetter(1)  # of a queued (seq, record)


def _only_inferences(queued: deque[tuple[int, Any]], first: int) -> bool:
    """Whether the `first` queued (seq, record) pairs are all inference records; their
    types read in C (a generator of `type(r) is ...` tests cost the writer, holding the
    GIL the event loop waits for, twice as much)."""
    return set(map(type, map(_RECORD, itertools.islice(queued, first)))) == {InferenceRecord}


_INFERENCE_FIXED_BYTES = 64 + 8 * len(InferenceRecord._fields)
# The most `_approx_bytes` says of a bounded inference record.
INFERENCE_MOST_BYTES = _INFERENCE_FIXED_BYTES + MAX_INFERENCE_TEXT_CHARS


def register_boot(path: Path, boot_id: str) -> None:
    """Persist this process's boot id (durable mark 0) before it numbers any record, and
    forget all but the last MAX_BOOTS processes registered (by `n`, not by `started`: a
    process whose clock is behind must not forget its own mark)."""
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO boots (boot_id, started, durable_seq) VALUES (?, ?, 0)",
            (boot_id, time.time()),
        )
        conn.execute(
            "DELETE FROM boots WHERE n NOT IN (SELECT n FROM boots ORDER BY n DESC LIMIT ?)",
            (MAX_BOOTS,),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def durable_marks(conn: sqlite3.Connection) -> dict[str, int]:
    """Each recent process's durable mark: boot id -> highest committed sequence number,
    oldest process first."""
    rows = conn.execute("SELECT boot_id, durable_seq FROM boots ORDER BY n")
    return {boot: seq for boot, seq in rows}


# Rows per INSERT statement. The sqlite3 module releases the GIL around every statement
# step, so executemany hands the GIL back and forth with the busy event loop once per
# row (a futex wake and a context switch each); one statement of many rows does it once.
# Powers of two down to 1 insert any count with a handful of cached statements; 32 rows
# of the widest table stay under SQLite's oldest limit of 999 parameters.
ROWS_PER_INSERT = 32


# Inference fields that hold these values in almost every row (no experiment, no subject
# header, not a shadow copy, no error, no randomisation unit), and their SQL literals.
# sqlite3 binds None and bool through its adapter lookup, about 260 ns a value on Python
# 3.11 against 20 for an int or a float, holding the GIL the event loop waits for: a
# chunk whose rows all hold them is inserted by a statement with them written in.
_USUAL = {
    "experiment": (None, "NULL"),
    "variant": (None, "NULL"),
    "subject_hash": (None, "NULL"),
    "shadow": (False, "0"),
    "error": (None, "NULL"),
    "unit_hash": (None, "NULL"),
}
_USUAL_VALUES = tuple(value for value, _ in _USUAL.values())
_USUAL_HELD = operator.itemgetter(*map(InferenceRecord._fields.index, _USUAL))
# The fields a usual record's row binds, in column order.
_USUAL_BOUND = operator.itemgetter(
    *(i for i, name in enumerate(InferenceRecord._fields) if name not in _USUAL)
)


def _usual_records(chunk: list[tuple[int, Any]]) -> list[InferenceRecord] | None:
    """The records of `chunk` when it is the usual one: inferences holding `_USUAL_VALUES`
    with consecutive sequence numbers (as every chunk of the in-order queue has), so that
    `_insert_usual` can write their rows; else None."""
    if chunk[-1][0] - chunk[0][0] != len(chunk) - 1:
        return None
    records = list(map(_RECORD, chunk))
    if set(map(type, records)) == {InferenceRecord} and all(
        map(_USUAL_VALUES.__eq__, map(_USUAL_HELD, records))
    ):
        return records
    return None


def _parts(count: int) -> Iterator[tuple[int, int]]:
    """(start, rows) of the multi-row statements that insert `count` rows: as many of
    ROWS_PER_INSERT as fit, then powers of two, so a handful of statements are cached."""
    done, size = 0, ROWS_PER_INSERT
    while done < count:
        while count - done < size:
            size //= 2
        yield done, size
        done += size


@functools.lru_cache(maxsize=64)
def _insert_sql(table: str, rows: int = 1) -> str:
    """The INSERT of `rows` rows, every value bound."""
    names = ["record_id", *_COLUMNS[table], "data_region", *_EXTRA.get(table, {})]
    one = f"({', '.join('?' * len(names))})"
    return f"INSERT INTO {table} ({', '.join(names)}) VALUES {', '.join([one] * rows)}"


@functools.lru_cache(maxsize=16)
def _usual_sql(rows: int) -> str:
    """The INSERT of `rows` usual inference rows of consecutive records: `_USUAL`'s
    literals written in, and each record_id built by SQLite from `?1` (the "<boot>-"
    prefix) and `?2` (the first row's sequence number), the same text as `f"{boot}-{seq}"`;
    `?3` is the data region; the fields `_USUAL_BOUND` reads follow, row by row."""
    names = ["record_id", *_COLUMNS["inferences"], "data_region"]
    numbers = itertools.count(4)
    groups = []
    for row in range(rows):
        fixed = {"record_id": f"?1 || (?2 + {row})", "data_region": "?3"}
        fixed.update((name, literal) for name, (_, literal) in _USUAL.items())
        values = [fixed.get(name) or f"?{next(numbers)}" for name in names]
        groups.append(f"({', '.join(values)})")
    return f"INSERT INTO inferences ({', '.join(names)}) VALUES {', '.join(groups)}"


def _insert_rows(conn: sqlite3.Connection, table: str, values: list[tuple]) -> None:
    """Insert `values` in a few multi-row statements (see ROWS_PER_INSERT)."""
    for start, rows in _parts(len(values)):
        part = values[start : start + rows]
        conn.execute(_insert_sql(table, rows), tuple(itertools.chain.from_iterable(part)))


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
        on_batch: Callable[[Sequence[Any]], None] | None = None,
        on_commit: Callable[[sqlite3.Connection], None] | None = None,
        wal_budget_bytes: int = WAL_LIMIT_BYTES,
    ) -> None:
        self.path = path
        self.wal_budget_bytes = wal_budget_bytes
        # Rows on the wire to the collector (table -> seqs), set on this writer thread by
        # the command that takes a batch (sync.take_batch): the size cap and retention
        # pass over them, so a row cannot be both delivered and counted dropped.
        self.sending: dict[str, frozenset[int]] = {}
        self.data_region = data_region
        self.capacity = queue_records
        self.batch_records = batch_records
        self.interval_s = interval_s
        self._on_drop = on_drop or (lambda table, reason, n: None)
        self._on_batch = on_batch
        self._on_commit = on_commit
        self._lock = threading.Lock()  # guards _pending, _seq, dropped
        self._pending: deque[tuple[int, Any]] = deque()
        self._in_hand = 0  # taken by the writer, not yet committed; counts against capacity
        # (command, future, seq of the last record accepted before it was submitted)
        self._commands: deque[tuple[Callable[[sqlite3.Connection], Any], Future, int]] = deque()
        self._wake = threading.Event()
        self._durable = threading.Condition()
        # Record ids are "<boot>-<seq>": unique across restarts without a counter on disk.
        self.boot_id = secrets.token_hex(8)
        self._seq = 0
        self.durable_seq = 0
        self.observed_seq = 0  # last record handed to `on_batch` (metrics, alert windows)
        self.dropped = 0
        self.write_errors = 0
        self._stop = threading.Event()
        self._audit_head = audit.GENESIS
        path.parent.mkdir(parents=True, exist_ok=True)
        # A buffer found unreadable at start: (file moved aside, unsynced rows left in it or
        # None when they could not be counted); the rows are counted as dropped (`corrupt`).
        self.quarantined: tuple[Path, int | None] | None = None
        try:
            create_schema(path)
        except sqlite3.DatabaseError as exc:  # not a database (any more): keep it, start anew
            aside = quarantine(path)
            lost = count_unsynced_salvaged(aside)
            log.error(
                "telemetry buffer unreadable error=%r moved_to=%s unsynced_rows=%s",
                str(exc),
                aside,
                "unknown" if lost is None else sum(lost.values()),
            )
            create_schema(path)
            self._count_quarantined(lost or {})
            self.quarantined = (aside, None if lost is None else sum(lost.values()))
        os.chmod(path, 0o600)
        register_boot(path, self.boot_id)
        self._thread = threading.Thread(target=self._run, name="telemetry-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _count_quarantined(self, lost: dict[str, int]) -> None:
        conn = connect(self.path)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for table, count in lost.items():
                self.record_drop(conn, table, "corrupt", count)
            conn.execute("COMMIT")
        finally:
            conn.close()

    def record_id(self, seq: int) -> str:
        """`<boot>-<seq>`: the record's id, and what `x-telemetry-seq` carries."""
        return f"{self.boot_id}-{seq}"

    # -- any thread -----------------------------------------------------------------
    def add(self, record: Any) -> int:
        """Queue a record; its sequence number, or 0 when the queue is full (dropped).

        Never blocks beyond a short lock, never raises: this is on the request path.
        Inference records come cut to their bounds (`InferenceRecord.ended`, else
        `Telemetry.record_inference`): the writer sizes its chunks by them (`_take_chunk`).
        """
        with self._lock:
            pending = self._pending
            if len(pending) + self._in_hand < self.capacity:
                seq = self._seq + 1
                self._seq = seq
                pending.append((seq, record))
                return seq
            self.dropped += 1
        self._on_drop(RECORD_TABLE.get(type(record), "other"), "queue_full", 1)
        return 0

    @property
    def last_seq(self) -> int:
        return self._seq

    def backlog_in_memory(self) -> int:
        return len(self._pending) + self._in_hand

    def submit(self, command: Callable[[sqlite3.Connection], Any]) -> Future:
        """Run `command(conn)` on the writer thread, once every record accepted before this
        call is committed (so a forget also removes rows that were still in memory)."""
        future: Future = Future()
        with self._lock:
            self._commands.append((command, future, self._seq))
        self._wake.set()
        return future

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every record accepted so far is committed (`durable_seq`)."""
        target = self._seq
        self._wake.set()
        with self._durable:
            return self._durable.wait_for(lambda: self.durable_seq >= target, timeout_s)

    def nudge(self) -> None:
        """Have the writer take the queue now instead of at its next interval."""
        self._wake.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # -- the writer thread --------------------------------------------------------------
    def _run(self) -> None:
        name_this_thread(WRITER_THREAD_NAME)
        conn = connect(self.path, self.wal_budget_bytes)
        self._audit_head = audit.last_hash(conn)
        # A process killed mid-write leaves its WAL (and maybe an untrimmed buffer) behind:
        # fold and trim them now, not at the first commit, which may be long in coming.
        self._keep_wal_in_budget(conn)
        self._after_commit(conn)
        backoff_s = 0.05
        try:
            while True:
                with self._lock:
                    batch, self._pending = self._pending, deque()
                    self._in_hand = len(batch)
                if batch:
                    if self._on_batch is not None:
                        self._observe(batch)
                    self.observed_seq = batch[-1][0]
                while batch:
                    chunk = self._take_chunk(batch)
                    while not self._write(conn, chunk):
                        # Disk full or I/O error: keep the records and retry; maintenance
                        # commands still run (the size cap may free space), new records
                        # wait in the queue and beyond its capacity are counted as drops.
                        self._run_commands(conn, in_order=False)
                        if self._stop.wait(backoff_s):
                            log.error("telemetry writer gave up at stop records=%d", len(chunk))
                            return
                        backoff_s = min(backoff_s * 2, 5.0)
                    backoff_s = 0.05
                    self._in_hand = len(batch)
                    self._keep_wal_in_budget(conn)
                    self._after_commit(conn)
                self._run_commands(conn)
                if self._stop.is_set() and not self._pending and not self._commands:
                    break
                if (
                    len(self._pending) < self.batch_records
                    and not self._commands
                    and not self._stop.is_set()
                ):
                    # Group commit: one fsync per interval rather than per trickle of
                    # records; flush() and submit() cut the wait short, a full batch or a
                    # command waiting for its records skips it.
                    self._wake.wait(self.interval_s)
                    self._wake.clear()
        finally:
            conn.close()

    def _take_chunk(self, batch: deque[tuple[int, Any]]) -> list[tuple[int, Any]]:
        """One transaction's records: up to `batch_records`, and no more than fit in a
        quarter of the WAL budget (a row's pages with its indexes take about twice its
        text), so one commit cannot push the files past the cap's margin.

        Inference records are bounded (`records.bounded`): a batch of them that would fit
        even if each were as large as its bounds allow (the usual batch) is taken whole
        without measuring each record, which cost the writer about 2 us a record."""
        room = self.wal_budget_bytes / 4
        limit = min(len(batch), self.batch_records)
        take = batch.popleft
        if limit * INFERENCE_MOST_BYTES <= room and _only_inferences(batch, limit):
            if limit == len(batch):  # the usual batch: all of it
                chunk = list(batch)
                batch.clear()
                return chunk
            return [take() for _ in range(limit)]
        chunk = [take()]  # the first record goes in whatever its size
        room -= _approx_bytes(chunk[0][1])
        while batch and len(chunk) < limit:
            size = _approx_bytes(batch[0][1])
            if size > room:
                break
            room -= size
            chunk.append(take())
        return chunk

    def _keep_wal_in_budget(self, conn: sqlite3.Connection) -> None:
        """Checkpoint and truncate a WAL that grew over its budget."""
        if wal_bytes(self.path) <= self.wal_budget_bytes:
            return
        conn.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:  # a reader in the way: the next commit tries again
            log.info("telemetry checkpoint deferred error=%r", str(exc))
        finally:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def _observe(self, batch: deque[tuple[int, Any]]) -> None:
        try:
            self._on_batch([record for _, record in batch])  # type: ignore[misc]
        except Exception:  # metrics must never stop records being written
            log.exception("telemetry batch observer failed")

    def _after_commit(self, conn: sqlite3.Connection) -> None:
        if self._on_commit is None:
            return
        try:
            self._on_commit(conn)
        except Exception:  # a failed size check must not stop the writer
            log.exception("telemetry after-commit hook failed")
            if conn.in_transaction:
                conn.execute("ROLLBACK")

    def _write(self, conn: sqlite3.Connection, chunk: list[tuple[int, Any]]) -> bool:
        """Insert one chunk in one transaction; False if it should be retried.

        OperationalError (disk full, I/O, locked) is worth retrying; anything else is a
        malformed record, so the chunk is redone row by row, skipping and counting those.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                head = self._insert_all(conn, chunk)
            except sqlite3.OperationalError:
                raise
            except Exception:
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                head = self._insert_each(conn, chunk)
            conn.execute(
                "UPDATE boots SET durable_seq = ? WHERE boot_id = ?", (chunk[-1][0], self.boot_id)
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("telemetry write failed records=%d error=%r", len(chunk), str(exc))
            return False
        self._audit_head = head
        with self._durable:
            self.durable_seq = chunk[-1][0]
            self._durable.notify_all()
        return True

    def _row(self, seq: int, record: Any, head: str) -> tuple[str, tuple, str]:
        """(table, values, audit chain head after this row)."""
        if type(record) is InferenceRecord:
            return "inferences", self._inference_rows([(seq, record)])[0], head
        table = RECORD_TABLE[type(record)]
        row = (f"{self.boot_id}-{seq}", *_VALUES[type(record)](record), self.data_region)
        if table == "audit":
            digest = audit.link(head, dict(zip(AUDIT_NAMES, row, strict=True)))
            return table, (*row, head, digest), digest
        return table, row, head

    def _inference_rows(self, chunk: list[tuple[int, Any]]) -> list[tuple]:
        """The rows of the chunk's inference records (the bulk of every batch), in one
        comprehension: a `_row` call per record cost the writer, holding the GIL the
        event loop waits for, about twice as much."""
        boot, region = self.boot_id, self.data_region
        return [
            (f"{boot}-{seq}", *record, region)
            for seq, record in chunk
            if type(record) is InferenceRecord
        ]

    def _insert_usual(
        self, conn: sqlite3.Connection, first_seq: int, records: list[InferenceRecord]
    ) -> None:
        """Insert usual inference records numbered from `first_seq` (`_usual_records`):
        the same rows, with the six values that cost sqlite3 the most to bind written into
        the statement, and the record id and region made by SQLite. No Python row per
        record: the writer holds the GIL the event loop waits for only to read each
        record's bound fields (`_USUAL_BOUND`) into the parameters."""
        prefix, region = f"{self.boot_id}-", self.data_region
        fields = list(map(_USUAL_BOUND, records))
        for start, rows in _parts(len(fields)):
            conn.execute(
                _usual_sql(rows),
                (
                    prefix,
                    first_seq + start,
                    region,
                    *itertools.chain.from_iterable(fields[start : start + rows]),
                ),
            )

    def _insert_all(self, conn: sqlite3.Connection, chunk: list[tuple[int, Any]]) -> str:
        head = self._audit_head or audit.GENESIS
        usual = _usual_records(chunk)
        if usual is not None:  # the usual chunk: no audit row, so the chain head stays
            self._insert_usual(conn, chunk[0][0], usual)
            return head
        rows: dict[str, list[tuple]] = {"inferences": self._inference_rows(chunk)}
        if len(rows["inferences"]) < len(chunk):
            for seq, record in chunk:
                if type(record) is not InferenceRecord:
                    table, row, head = self._row(seq, record, head)
                    rows.setdefault(table, []).append(row)
        for table, values in rows.items():
            if values:
                _insert_rows(conn, table, values)
        return head

    def _insert_each(self, conn: sqlite3.Connection, chunk: list[tuple[int, Any]]) -> str:
        head = self._audit_head or audit.GENESIS
        for seq, record in chunk:
            try:
                table, row, after = self._row(seq, record, head)
                conn.execute(_insert_sql(table), row)
            except sqlite3.OperationalError:
                raise
            except Exception as exc:
                self.write_errors += 1
                log.error("telemetry record refused seq=%d error=%s", seq, type(exc).__name__)
                self.record_drop(conn, RECORD_TABLE.get(type(record), "other"), "write_error", 1)
                continue
            head = after  # the chain only advances over rows that were stored
        return head

    def _run_commands(self, conn: sqlite3.Connection, in_order: bool = True) -> None:
        """Run submitted commands in order, stopping at one whose records are not yet
        committed (the next turn writes them). While writes fail, run them regardless:
        the size cap may be what frees the disk."""
        while self._commands:
            command, future, after_seq = self._commands[0]
            if in_order and after_seq > self.durable_seq:
                return
            self._commands.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(command(conn))
            except Exception as exc:  # handed to the caller, who logs it
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                future.set_exception(exc)
            self._keep_wal_in_budget(conn)  # marking rows synced writes pages too

    def record_drop(self, conn: sqlite3.Connection, table: str, reason: str, count: int) -> None:
        if count <= 0:
            return
        conn.execute(
            "INSERT INTO drops (table_name, reason, count) VALUES (?, ?, ?) "
            "ON CONFLICT (table_name, reason) DO UPDATE SET count = count + excluded.count",
            (table, reason, count),
        )
        self._on_drop(table, reason, count)
