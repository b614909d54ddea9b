"""The local buffer: bounded size with a stated drop order, counted drops, durability
across SIGKILL of the server."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgeserve.telemetry import maintenance
from edgeserve.telemetry.records import EventRecord, InferenceRecord
from edgeserve.telemetry.store import TelemetryStore
from tests.serving import MODELS, run_server

ROW = np.load(MODELS / "digits" / "heldout.npz")["X"][0].tolist()
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}


def _inference(i: int) -> InferenceRecord:
    return InferenceRecord(
        f"req-{i}", "digits", "1", 200, 0.001, 0.0001, 0.0005, 1, time.time(), error="x" * 200
    )


def _store(tmp_path: Path, **kwargs: object) -> TelemetryStore:
    store = TelemetryStore(
        tmp_path / "telemetry.db",
        "ae",
        kwargs.pop("queue", 200_000),  # type: ignore[arg-type]
        5000,
        0.01,
    )
    store.start()
    return store


def _count(store: TelemetryStore, table: str, where: str = "1") -> int:
    with sqlite3.connect(store.path) as db:
        return db.execute(f"SELECT count(*) FROM {table} WHERE {where}").fetchone()[0]


def test_size_cap_drops_synced_first_then_lowest_priority_and_counts_each(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    produced_inferences, produced_events = 30_000, 2_000
    for i in range(produced_inferences):
        store.add(_inference(i))
    for i in range(produced_events):
        store.add(EventRecord("purchase", float(i), None, time.time()))
    assert store.flush(60)
    # The first 5,000 inference rows were acknowledged upstream.
    store.submit(lambda c: maintenance.mark_synced(c, "inferences", list(range(1, 5001)))).result()
    cap = 2 * 1024 * 1024
    assert maintenance.database_bytes(store.path) > cap  # the upstream has been down long
    store.submit(lambda c: maintenance.enforce_size_cap(store, c, cap)).result()
    drops = store.submit(maintenance.drop_counts).result()
    store.stop()

    assert maintenance.database_bytes(store.path) <= cap
    assert _count(store, "inferences", "synced = 1") == 0  # synced rows went first
    assert _count(store, "events") == produced_events  # higher priority kept whole
    kept = _count(store, "inferences")
    unsynced_missing = (produced_inferences - 5000) - kept
    assert drops == {("inferences", "size_cap"): unsynced_missing}
    with sqlite3.connect(store.path) as db:  # the oldest went, the newest stayed
        newest = db.execute("SELECT max(seq) FROM inferences").fetchone()[0]
    assert newest == produced_inferences


def test_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    store = TelemetryStore(tmp_path / "telemetry.db", "ae", 100, 10, 10.0)  # writer not started
    seqs = [store.add(_inference(i)) for i in range(150)]
    assert seqs.count(0) == 50
    assert store.dropped == 50


def test_retention_and_forget_remove_rows_and_leave_no_trace_in_the_wal(tmp_path: Path) -> None:
    store = _store(tmp_path)
    old = InferenceRecord(
        "old", "digits", "1", 200, 0.1, 0, 0, 1, time.time() - 10 * 86400, subject_hash="s-old"
    )
    store.add(old)
    for i in range(10):
        store.add(
            InferenceRecord(
                f"r{i}", "digits", "1", 200, 0.1, 0, 0, 1, time.time(), subject_hash="subject-42"
            )
        )
    assert store.flush(10)
    removed = store.submit(lambda c: maintenance.apply_retention(store, c, 86400)).result()
    assert removed == 1
    assert store.submit(lambda c: maintenance.forget_subject(store, c, "subject-42")).result() == 10
    store.stop()
    assert _count(store, "inferences") == 0
    assert _count(store, "forget_requests") == 1
    wal = Path(f"{store.path}-wal")
    assert not wal.exists() or b"subject-42" not in wal.read_bytes()
    # Only the forget request itself names the subject (its record id and hash column):
    # secure_delete zeroed the deleted rows and their index entries.
    assert store.path.read_bytes().count(b"subject-42") == 2


@pytest.mark.slow
def test_records_acknowledged_as_durable_survive_sigkill_of_the_server(tmp_path: Path) -> None:
    """The guarantee: a response carrying x-telemetry-seq S, once /api/telemetry/status has
    reported durable_seq >= S, is on disk whatever happens to the process next."""
    for cycle in range(3):
        with run_server(
            tmp_path, "[auth]\nenabled = false\n[telemetry]\nwrite_interval_ms = 50.0\n"
        ) as server:
            answered: list[tuple[int, str]] = []
            durable = 0
            stop = threading.Event()

            def load(
                cycle: int = cycle, stop: threading.Event = stop, answered: list = answered
            ) -> None:
                with httpx.Client(timeout=5) as client:
                    i = 0
                    while not stop.is_set():
                        rid = f"c{cycle}-{i}"
                        i += 1
                        try:
                            reply = client.post(
                                f"{server.url}/v2/models/digits/infer", json={**BODY, "id": rid}
                            )
                        except httpx.TransportError:
                            return
                        answered.append((int(reply.headers["x-telemetry-seq"]), rid))

            threads = [threading.Thread(target=load) for _ in range(4)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                durable = httpx.get(f"{server.url}/api/telemetry/status").json()["durable_seq"]
                time.sleep(0.05)
            os.kill(server.process.pid, signal.SIGKILL)  # mid-load, mid-write
            stop.set()
            for t in threads:
                t.join()
            server.process.wait()
        guaranteed = {rid for seq, rid in answered if 0 < seq <= durable}
        with sqlite3.connect(tmp_path / "state" / "telemetry.db") as db:
            stored = {r[0] for r in db.execute("SELECT request_id FROM inferences")}
        assert guaranteed, "the load produced no acknowledged records"
        assert guaranteed <= stored, f"lost {len(guaranteed - stored)} acknowledged records"
        print(
            f"\ncycle {cycle}: answered={len(answered)} guaranteed={len(guaranteed)} "
            f"stored={len([r for r in stored if r.startswith(f'c{cycle}-')])}"
        )
