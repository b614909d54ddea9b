"""What prediction drift compares, kept up to date from the telemetry buffer.

A version's baseline is its first `baseline_requests` answered requests this watcher
saw, saved once in a small table of its own (`<state_dir>/drift-baselines.db`, at most
`MAX_VERSIONS` versions, the oldest dropped): forgetting, retention or eviction of
those rows later does not slide it onto newer, possibly drifted, requests. The live
window is the version's latest `window_requests` requests after its baseline, held in
memory. Each check reads only the rows added since the previous one (by `seq`, the
buffer's primary key), never a GROUP BY over the whole buffer.

After a restart the baselines are read back; the live windows refill from the last
`START_ROWS` rows, and a version still collecting its baseline starts collecting afresh.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import deque
from pathlib import Path

import numpy as np

from edgeserve.experiments.drift import DriftCheck, Histogram, compare_histograms

MAX_VERSIONS = 256  # saved baselines (and baselines being collected), a bound on memory too
READ_ROWS = 200_000  # rows read per check at most; a larger backlog is read over several
START_ROWS = 50_000  # rows read back at start to refill the live windows

Key = tuple[str, str]  # (model, version)

_SCHEMA = """CREATE TABLE IF NOT EXISTS baselines (
    model TEXT NOT NULL, version TEXT NOT NULL, requests INTEGER NOT NULL,
    classes TEXT NOT NULL, scores TEXT NOT NULL, last_seq INTEGER NOT NULL,
    saved REAL NOT NULL, PRIMARY KEY (model, version))"""


class DriftWatch:
    """Baselines (saved) and live windows (in memory) of every version; `check` is called
    from one thread at a time (the drift loop)."""

    def __init__(self, telemetry_db: Path, baselines_db: Path) -> None:
        self.telemetry_db = telemetry_db
        self.baselines_db = baselines_db
        self._baselines: dict[Key, tuple[Histogram, int]] = {}  # histogram, its last seq
        self._collecting: dict[Key, Histogram] = {}
        self._live: dict[Key, deque[tuple[str | None, float | None]]] = {}
        self._cursor: int | None = None  # the last seq read
        self._loaded = False

    def check(
        self, baseline_requests: int, window_requests: int, psi_threshold: float, min_window: int
    ) -> list[DriftCheck]:
        """Read the new rows, then check each version with at least `min_window` live ones."""
        if not self._loaded:
            self._load()
        if self.telemetry_db.exists():
            self._read(baseline_requests, window_requests)
        checks = []
        for key, live in sorted(self._live.items()):
            if len(live) >= min_window and key in self._baselines:
                base = self._baselines[key][0]
                checks.append(
                    compare_histograms(*key, base, Histogram.of(list(live)), psi_threshold)
                )
        return checks

    def _connect(self) -> sqlite3.Connection:
        self.baselines_db.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.baselines_db, timeout=10)
        db.execute(_SCHEMA)
        return db

    def _load(self) -> None:
        db = self._connect()
        try:
            for model, version, requests, classes, scores, last_seq in db.execute(
                "SELECT model, version, requests, classes, scores, last_seq FROM baselines"
            ):
                hist = Histogram(requests=requests)
                hist.classes.update(json.loads(classes))
                hist.scores = np.array(json.loads(scores), dtype=int)
                self._baselines[(model, version)] = (hist, last_seq)
        finally:
            db.close()
        self._loaded = True

    def _save(self, key: Key, hist: Histogram, last_seq: int) -> None:
        db = self._connect()
        try:
            with db:
                db.execute(
                    "INSERT OR REPLACE INTO baselines VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        *key,
                        hist.requests,
                        json.dumps(dict(hist.classes)),
                        json.dumps(hist.scores.tolist()),
                        last_seq,
                        time.time(),
                    ),
                )
                dropped = db.execute(
                    "SELECT model, version FROM baselines ORDER BY saved DESC LIMIT -1 OFFSET ?",
                    (MAX_VERSIONS,),
                ).fetchall()
                db.executemany("DELETE FROM baselines WHERE model = ? AND version = ?", dropped)
        finally:
            db.close()
        self._baselines[key] = (hist, last_seq)
        for model, version in dropped:
            self._baselines.pop((model, version), None)
            self._live.pop((model, version), None)

    def _read(self, baseline_requests: int, window_requests: int) -> None:
        db = sqlite3.connect(f"file:{self.telemetry_db}?mode=ro", uri=True, timeout=10)
        try:
            newest = db.execute("SELECT max(seq) FROM inferences").fetchone()[0] or 0
            if self._cursor is None or newest < self._cursor:  # start, or a new buffer
                self._cursor = max(0, newest - START_ROWS)
            rows = db.execute(
                "SELECT seq, model, version, prediction, top_score FROM inferences "
                "WHERE seq > ? AND status = 200 AND prediction IS NOT NULL ORDER BY seq LIMIT ?",
                (self._cursor, READ_ROWS),
            ).fetchall()
        finally:
            db.close()
        for seq, model, version, prediction, top_score in rows:
            key = (str(model), str(version))
            saved = self._baselines.get(key)
            if saved is not None:
                if seq > saved[1]:
                    live = self._live.get(key)
                    if live is None or live.maxlen != window_requests:
                        live = self._live[key] = deque(live or (), maxlen=window_requests)
                    live.append((prediction, top_score))
                continue
            hist = self._collecting.get(key)
            if hist is None:
                if len(self._collecting) >= MAX_VERSIONS:
                    continue
                hist = self._collecting[key] = Histogram()
            hist.add(prediction, top_score)
            if hist.requests >= baseline_requests:
                del self._collecting[key]
                self._save(key, hist, seq)
        if rows:
            self._cursor = rows[-1][0]
