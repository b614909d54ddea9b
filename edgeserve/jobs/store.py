"""Jobs persisted in `<state_dir>/jobs.db` (SQLite, WAL): spec, status and checkpoint.

The checkpoint columns (rows_done, output_pos, errors_pos) are updated in one
transaction after the chunk's output was fsynced, which is what makes a restart
resume exactly where the last durable chunk ended.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson

from edgeserve.offline.run import RunState

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    input_path TEXT NOT NULL,
    input_format TEXT NOT NULL,
    input_fingerprint TEXT NOT NULL,
    output_format TEXT NOT NULL,
    options TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    rows_total INTEGER,
    rows_done INTEGER NOT NULL DEFAULT 0,
    output_pos INTEGER NOT NULL DEFAULT 0,
    errors_pos INTEGER NOT NULL DEFAULT 0,
    scored INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
)
"""


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    model: str
    version: int
    input_path: str
    input_format: str
    input_fingerprint: str
    output_format: str
    options: dict = field(default_factory=dict)  # map, keep, outputs
    status: str = QUEUED
    error: str | None = None
    rows_total: int | None = None
    rows_done: int = 0
    output_pos: int = 0
    errors_pos: int = 0
    scored: int = 0
    failed: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def state(self) -> RunState:
        return RunState(self.rows_done, self.output_pos, self.errors_pos, self.scored, self.failed)


_COLUMNS = [f.name for f in fields(Job)]


DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
MAX_JOB_ID_CHARS = 63 + 1 + 32  # a pod name (a DNS label), ".", a uuid4 in hex


def pod_name() -> str:
    """This pod's name: HOSTNAME, which Kubernetes sets to it, when it is a DNS label
    (else "": a name that cannot be a host in a URL is no use to a client)."""
    name = os.environ.get("HOSTNAME", "")
    return name if DNS_LABEL.fullmatch(name) else ""


def new_job_id(pod: str = "") -> str:
    """A fresh job id; `<pod>.<hex>` on a pod. Jobs live on the pod that took them: a
    client that submitted through the Service reads from the id which pod to ask again
    (`<pod>.edgeserve-peers` on the StatefulSet)."""
    token = uuid.uuid4().hex
    return f"{pod}.{token}" if pod else token


def input_fingerprint(path: Path) -> str:
    """Size and mtime: a path input changed under a job is refused, not half-rescored."""
    st = path.stat()
    return orjson.dumps([st.st_size, st.st_mtime_ns]).decode()


class JobStore:
    """All job rows; one connection behind a lock (the runner thread and the event loop
    both use it, each statement is short)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def add(self, job: Job) -> Job:
        job = _replace(job, created_at=time.time())
        row = asdict(job)
        row["options"] = orjson.dumps(job.options).decode()
        marks = ", ".join("?" * len(_COLUMNS))
        with self._lock:
            self._conn.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})",
                [row[c] for c in _COLUMNS],
            )
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return _job(row) if row else None

    def list(self, owner: str | None = None, limit: int = 100) -> list[Job]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        args: list[Any] = []
        if owner is not None:
            sql += " WHERE owner = ?"
            args.append(owner)
        sql += " ORDER BY created_at DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            return [_job(r) for r in self._conn.execute(sql, args)]

    def next_runnable(self) -> Job | None:
        """The oldest running (interrupted) or queued job."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE status IN (?, ?) "
                "ORDER BY status = 'queued', created_at LIMIT 1",
                ACTIVE,
            ).fetchone()
        return _job(row) if row else None

    def save_progress(self, job_id: str, state: RunState) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE jobs SET rows_done = ?, output_pos = ?, errors_pos = ?, scored = ?, "
                "failed = ? WHERE id = ? AND status = ?",
                (*asdict(state).values(), job_id, RUNNING),
            )

    def set_status(
        self, job_id: str, status: str, *, only_from: tuple[str, ...] = (), **extra: Any
    ) -> bool:
        """Move a job to `status` (only from the given states, if any); False if it was not."""
        sets = ["status = ?", *(f"{k} = ?" for k in extra)]
        sql = f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?"
        args: list[Any] = [status, *extra.values(), job_id]
        if only_from:
            sql += f" AND status IN ({','.join('?' * len(only_from))})"
            args.extend(only_from)
        with self._lock:
            return self._conn.execute(sql, args).rowcount == 1

    def ids_of(self, owner: str) -> tuple[str, ...]:
        """Every stored job of `owner`, in any state (their folders count to its quota)."""
        with self._lock:
            rows = self._conn.execute("SELECT id FROM jobs WHERE owner = ?", (owner,))
            return tuple(r[0] for r in rows)

    def count_active(self) -> int:
        with self._lock:
            return self._conn.execute(
                "SELECT COUNT(*) FROM jobs WHERE status IN (?, ?)", ACTIVE
            ).fetchone()[0]

    def expired(self, finished_before: float) -> list[str]:
        """Jobs that ended (done, failed, cancelled) before the given time."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id FROM jobs WHERE status NOT IN (?, ?) "
                "AND COALESCE(finished_at, created_at) < ?",
                (*ACTIVE, finished_before),
            )
            return [r[0] for r in rows]

    def delete(self, job_id: str) -> None:
        with self._lock:
            self._conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))


def _job(row: tuple) -> Job:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["options"] = orjson.loads(values["options"])
    return Job(**values)


def _replace(job: Job, **changes: Any) -> Job:
    from dataclasses import replace

    return replace(job, **changes)
