"""The local buffer: exact durable_seq, bounded size with a stated drop order, counted
drops, a hash-chained audit log, durability across SIGKILL of the writer and the server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import deque
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgeserve.telemetry import audit, maintenance
from edgeserve.telemetry.records import (
    AlertRecord,
    AuditRecord,
    EventRecord,
    FeedbackRecord,
    InferenceRecord,
    bounded,
)
from edgeserve.telemetry.service import build_telemetry
from edgeserve.telemetry.settings import TelemetrySettings
from edgeserve.telemetry.store import MAX_BOOTS, TelemetryStore, _approx_bytes, durable_marks
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

            def load(name: str, stop: threading.Event = stop, answered: list = answered) -> None:
                with httpx.Client(timeout=5) as client:
                    i = 0
                    while not stop.is_set():
                        rid = f"{name}-{i}"  # unique across threads and cycles
                        i += 1
                        try:
                            reply = client.post(
                                f"{server.url}/v2/models/digits/infer", json={**BODY, "id": rid}
                            )
                        except httpx.TransportError:
                            return
                        if reply.status_code == 200:  # a loaded box may shed with 429
                            answered.append(
                                (int(reply.headers["x-telemetry-seq"].rpartition("-")[2]), rid)
                            )

            threads = [threading.Thread(target=load, args=(f"c{cycle}t{k}",)) for k in range(4)]
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
            f"stored={len([r for r in stored if r.startswith(f'c{cycle}t')])}"
        )


def test_durable_seq_covers_every_record_below_it_with_many_producers(tmp_path: Path) -> None:
    """Sequence numbers are queued in order, so a committed batch never vouches for a
    record another thread numbered earlier but had not queued yet."""
    store = TelemetryStore(tmp_path / "telemetry.db", "ae", 1_000_000, 300, 0.001)
    store.start()
    checks: list[tuple[int, set[str]]] = []
    accepted: dict[int, str] = {}
    lock = threading.Lock()

    def produce(name: str) -> None:
        for i in range(3000):
            rid = f"{name}-{i}"
            seq = store.add(InferenceRecord(rid, "m", "1", 200, 0, 0, 0, 1, time.time()))
            with lock:
                accepted[seq] = rid

    def check() -> None:
        with sqlite3.connect(store.path) as db:
            while any(t.is_alive() for t in producers):
                durable = store.durable_seq
                stored = {r[0] for r in db.execute("SELECT request_id FROM inferences")}
                checks.append((durable, stored))
                time.sleep(0.01)

    producers = [threading.Thread(target=produce, args=(f"t{k}",)) for k in range(4)]
    checker = threading.Thread(target=check)
    for t in producers:
        t.start()
    checker.start()
    for t in producers:
        t.join()
    checker.join()
    assert store.flush(30)
    store.stop()
    assert len(accepted) == 12_000 and 0 not in accepted
    for durable, stored in checks:
        missing = [accepted[s] for s in range(1, durable + 1) if accepted[s] not in stored]
        assert not missing, f"durable_seq={durable} but {len(missing)} records below it missing"


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edgeserve.telemetry.records import InferenceRecord
    from edgeserve.telemetry.store import TelemetryStore

    store = TelemetryStore(Path(sys.argv[1]), "ae", 100_000, 500, 0.005)
    store.start()
    prefix, reported, i = sys.argv[2], 0, 0
    while True:
        i += 1
        seq = store.add(InferenceRecord(f"{prefix}-{i}", "m", "1", 200, 0, 0, 0, 1, time.time()))
        assert seq == i
        if store.durable_seq > reported:
            reported = store.durable_seq
            print(reported, flush=True)
        if i % 50 == 0:
            time.sleep(0.001)
    """
)


@pytest.mark.slow
def test_every_record_up_to_the_reported_durable_seq_survives_sigkill(tmp_path: Path) -> None:
    db_path = tmp_path / "telemetry.db"
    for cycle in range(4):
        with subprocess.Popen(  # the with closes the pipe (else a ResourceWarning)
            [sys.executable, "-c", CHILD, str(db_path), f"c{cycle}"],
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            assert child.stdout is not None
            reported = 0
            for line in child.stdout:  # kill it mid-write, after a few acknowledged batches
                reported = int(line)
                if reported >= 2000 * (cycle + 1):
                    break
            child.send_signal(signal.SIGKILL)
            child.wait()
        with sqlite3.connect(db_path) as db:  # opening it recovers the WAL
            stored = {
                r[0]
                for r in db.execute(
                    "SELECT request_id FROM inferences WHERE request_id LIKE ?", (f"c{cycle}-%",)
                )
            }
        missing = [i for i in range(1, reported + 1) if f"c{cycle}-{i}" not in stored]
        assert reported > 0
        assert not missing, f"cycle {cycle}: {len(missing)} acknowledged records lost"


def test_audit_rows_are_hash_chained_and_an_edit_is_found(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for i in range(5):
        store.add(AuditRecord("model.update", f"digits/{i}", "ok", "operator", "{}", time.time()))
        store.add(_inference(i))  # other tables interleave, the chain does not care
    assert store.flush(10)
    store.stop()
    with sqlite3.connect(store.path) as db:
        assert audit.verify(db) == audit.ChainReport(True, 5)
    store = _store(tmp_path)  # a restart continues the chain from the last row
    store.add(AuditRecord("model.rollback", "digits", "ok", "operator", "{}", time.time()))
    assert store.flush(10)
    store.stop()
    with sqlite3.connect(store.path) as db:
        assert audit.verify(db).ok and audit.verify(db).rows == 6
        db.execute("UPDATE audit SET outcome = 'refused' WHERE seq = 3")
        db.commit()
        report = audit.verify(db)
    assert not report.ok and report.first_bad_seq == 3


def test_malformed_records_are_counted_and_their_batch_neighbours_kept(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.add(_inference(1))
    store.add(InferenceRecord("bad", "m", "1", 200, object(), 0, 0, 1, time.time()))  # type: ignore[arg-type]
    store.add(AuditRecord("ok.1", "t", "ok", "op", "{}", time.time()))
    store.add(AuditRecord("bad", "t", "ok", "op", object(), time.time()))  # type: ignore[arg-type]
    store.add("not a record at all")
    store.add(AuditRecord("ok.2", "t", "ok", "op", "{}", time.time()))
    store.add(_inference(2))
    assert store.flush(10)
    drops = store.submit(maintenance.drop_counts).result()
    store.add(_inference(3))  # the writer is still alive
    assert store.flush(10)
    store.stop()
    assert _count(store, "inferences") == 3
    assert drops == {
        ("inferences", "write_error"): 1,
        ("audit", "write_error"): 1,
        ("other", "write_error"): 1,
    }
    with sqlite3.connect(store.path) as db:  # the chain skips what was not stored
        assert audit.verify(db) == audit.ChainReport(True, 2)


def _served(i: int, **labels: object) -> InferenceRecord:
    """An inference as most are: no experiment, subject, error or unit; not a shadow."""
    return InferenceRecord(
        f"s-{i}",
        "digits",
        "2",
        200,
        0.001,
        0.0001,
        0.0005,
        4,
        1.5 + i,
        **labels,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "odd",
    [
        None,  # every record usual: the statement with NULL and 0 written in
        {"experiment": "e", "variant": "b"},
        {"subject_hash": "h" * 32, "unit_hash": "u" * 32},
        {"shadow": True},
        {"error": "timeout", "status": 504},
    ],
)
def test_each_row_holds_its_record_whichever_statement_wrote_it(
    tmp_path: Path, odd: dict[str, object] | None
) -> None:
    records = [
        _served(i, top_score=0.5 if i % 2 else None, prediction="7", owner_hash="o" * 32)
        for i in range(70)
    ]
    if odd is not None:
        records[33] = records[33]._replace(**odd)
    store = _store(tmp_path)
    for record in records:
        store.add(record)
    assert store.flush(10)
    store.stop()
    names = ", ".join(InferenceRecord._fields).replace("time_unix", "time")
    with sqlite3.connect(store.path) as db:
        rows = db.execute(
            f"SELECT record_id, typeof(record_id), {names}, data_region FROM inferences "
            "ORDER BY seq"
        ).fetchall()
    assert rows == [
        (f"{store.boot_id}-{seq}", "text", *record, "ae")
        for seq, record in enumerate(records, start=1)
    ]


def test_a_malformed_record_among_usual_ones_is_counted_and_its_neighbours_kept(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    for i in range(10):
        store.add(_served(i))
    store.add(_served(10)._replace(total_s=object()))
    assert store.flush(10)
    drops = store.submit(maintenance.drop_counts).result()
    store.stop()
    assert _count(store, "inferences") == 10
    assert drops == {("inferences", "write_error"): 1}


@pytest.mark.slow
def test_size_cap_holds_through_a_long_outage_and_drops_in_the_stated_order(
    tmp_path: Path,
) -> None:
    """Upstream down for a long simulated period: records of every kind keep coming,
    maintenance runs between rounds; the buffer never ends a round over the cap, the
    lowest-priority table loses its oldest rows first, and the drop counters account
    for every row that is missing."""
    cap = 2 * 1024 * 1024
    settings = TelemetrySettings(max_db_bytes=cap, write_interval_ms=5.0)
    telemetry = build_telemetry(settings, tmp_path)
    produced = {"inferences": 0, "events": 0, "feedback": 0, "alerts": 0, "audit": 0}

    async def outage() -> None:
        await telemetry.start()
        for _ in range(12):
            for i in range(3000):
                telemetry.record_inference(_inference(i))
                produced["inferences"] += 1
                if i % 10 == 0:
                    telemetry.record_event(EventRecord("basket", 9.5, "s", time.time()))
                    telemetry.record_feedback(FeedbackRecord(f"req-{i}", "3", None, time.time()))
                    produced["events"] += 1
                    produced["feedback"] += 1
                if i % 500 == 0:
                    telemetry.record_alert(
                        AlertRecord("p99_latency", "firing", 1, "x", time.time())
                    )
                    telemetry.record_audit("model.update", "digits", "ok")
                    produced["alerts"] += 1
                    produced["audit"] += 1
            assert await telemetry.flush(30)
            await telemetry.maintain_once()
            assert maintenance.database_bytes(telemetry.store.path) <= cap
        await telemetry.stop()

    asyncio.run(outage())
    store = telemetry.store
    with sqlite3.connect(store.path) as db:
        drops = maintenance.drop_counts(db)
        kept = {t: _count(store, t) for t in produced}
        oldest_kept = db.execute("SELECT min(seq) FROM inferences").fetchone()[0]
        newest = db.execute("SELECT max(seq) FROM inferences").fetchone()[0]
    assert drops[("inferences", "size_cap")] > 0  # the cap did bite
    for table, n in produced.items():  # every missing row is counted
        assert n - kept[table] == drops.get((table, "size_cap"), 0), table
    for table in ("events", "feedback", "alerts", "audit"):  # higher priority kept whole
        assert kept[table] == produced[table], table
    assert newest == produced["inferences"]  # the newest stayed ...
    assert kept["inferences"] == _count(store, "inferences", f"seq >= {oldest_kept}")  # ... no gaps
    metric = telemetry.metrics.registry.get_sample_value(
        "edgeserve_telemetry_dropped_total", {"table": "inferences", "reason": "size_cap"}
    )
    assert metric == drops[("inferences", "size_cap")]


def test_a_command_runs_after_every_record_accepted_before_it(tmp_path: Path) -> None:
    """So forgetting a subject also removes its rows that were still in memory."""
    store = TelemetryStore(tmp_path / "telemetry.db", "ae", 10_000, 100, 60.0)  # slow writer
    store.start()
    for i in range(250):
        store.add(
            InferenceRecord(f"r{i}", "m", "1", 200, 0, 0, 0, 1, time.time(), subject_hash="s1")
        )
    removed = store.submit(lambda c: maintenance.forget_subject(store, c, "s1")).result(10)
    store.stop()
    assert removed == 250
    assert _count(store, "inferences") == 0


def test_retention_is_per_table_and_counts_unsynced_rows_it_removes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    old = time.time() - 40 * 86400
    for i in range(3):
        store.add(InferenceRecord(f"old-{i}", "m", "1", 200, 0, 0, 0, 1, old))
        store.add(AuditRecord("model.update", "m", "ok", "ops", "{}", old))
    store.add(_inference(1))
    assert store.flush(10)
    store.submit(lambda c: maintenance.mark_synced(c, "inferences", [1])).result()
    ages = TelemetrySettings().retention.max_age_s()  # inferences 30 days, audit 365
    removed = store.submit(lambda c: maintenance.apply_retention(store, c, ages)).result()
    drops = store.submit(maintenance.drop_counts).result()
    store.stop()
    assert removed == 3
    assert _count(store, "inferences") == 1 and _count(store, "audit") == 3
    assert drops == {("inferences", "retention"): 2}  # the synced one was not a loss


def test_a_full_disk_keeps_records_in_memory_and_writes_them_once_space_returns(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path)
    store.add(_inference(0))
    assert store.flush(10)
    # The writer's connection may not grow the file any more: inserts fail as on a full disk.
    store.submit(
        lambda c: c.execute(f"PRAGMA max_page_count={c.execute('PRAGMA page_count').fetchone()[0]}")
    ).result()
    seqs = [store.add(_inference(i)) for i in range(1, 3001)]
    assert 0 not in seqs
    assert not store.flush(1.0)  # nothing of it is durable yet, and nothing was dropped
    store.submit(lambda c: c.execute("PRAGMA max_page_count=1073741823"))  # space is back
    assert store.flush(30)
    drops = store.submit(maintenance.drop_counts).result()
    store.stop()
    assert _count(store, "inferences") == 3001
    assert drops == {}


def test_an_unreadable_buffer_is_moved_aside_and_recording_goes_on(tmp_path: Path) -> None:
    (tmp_path / "telemetry.db").write_bytes(b"this is not a database" * 100)
    store = _store(tmp_path)
    store.add(_inference(1))
    assert store.flush(10)
    store.stop()
    assert _count(store, "inferences") == 1
    (aside,) = tmp_path.glob("telemetry.db.corrupt-*")
    assert aside.read_bytes().startswith(b"this is not a database")


def test_a_long_reader_does_not_make_the_size_cap_delete_everything(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for i in range(30_000):
        store.add(_inference(i))
    assert store.flush(60)
    before = store.submit(maintenance.used_bytes).result()
    reader = sqlite3.connect(store.path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM inferences").fetchone()  # holds its snapshot
    cap = 4 * 1024 * 1024
    deleted = store.submit(lambda c: maintenance.enforce_size_cap(store, c, cap)).result(30)
    reader.execute("COMMIT")
    reader.close()
    used = store.submit(maintenance.used_bytes).result()
    store.submit(lambda c: maintenance.enforce_size_cap(store, c, cap)).result(30)
    store.stop()
    kept = _count(store, "inferences")
    assert used <= cap * maintenance.CAP_TARGET
    needed_kept = 30_000 * cap * maintenance.CAP_TARGET / before  # rows fit under the target
    assert deleted + kept == 30_000
    assert kept >= needed_kept - maintenance.CAP_STEP * 30_000  # at most one step too many
    assert maintenance.database_bytes(store.path) <= cap  # once the reader left


def test_a_buffer_with_full_label_indexes_gets_partial_ones_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    """Rows without an experiment or subject (most of them) cost no index entry; a buffer
    written before that is converted at start, and lookups by those columns still use it."""
    path = tmp_path / "telemetry.db"
    store = _store(tmp_path)
    store.add(InferenceRecord("a", "m", "1", 200, 0, 0, 0, 1, time.time(), "e", "v", None, "h"))
    assert store.flush(10)
    store.stop()
    with sqlite3.connect(path) as db:  # as buffers before 0.2 had them
        db.execute("DROP INDEX idx_inferences_subject_hash")
        db.execute("CREATE INDEX idx_inferences_subject_hash ON inferences (subject_hash)")
    _store(tmp_path).stop()
    with sqlite3.connect(path) as db:
        definitions = dict(
            db.execute("SELECT name, sql FROM sqlite_master WHERE name LIKE 'idx_inferences_%'")
        )
        plan = db.execute(
            "EXPLAIN QUERY PLAN SELECT request_id FROM inferences WHERE subject_hash = ?", ("h",)
        ).fetchall()
        found = db.execute("SELECT request_id FROM inferences WHERE subject_hash = 'h'").fetchall()
    assert "WHERE subject_hash IS NOT NULL" in definitions["idx_inferences_subject_hash"]
    assert "WHERE experiment IS NOT NULL" in definitions["idx_inferences_experiment_variant"]
    assert "idx_inferences_subject_hash" in str(plan)
    assert found == [("a",)]


def test_a_process_whose_clock_is_behind_keeps_its_durable_mark(tmp_path: Path) -> None:
    """Earlier processes ran with a clock ahead (their `started` is in this process's
    future); the newest process is still the newest boot, and its mark is kept."""
    path = tmp_path / "telemetry.db"
    _store(tmp_path).stop()
    ahead = time.time() + 86400
    with sqlite3.connect(path) as db:  # MAX_BOOTS earlier processes, clocks a day ahead
        for i in range(MAX_BOOTS):
            db.execute(
                "INSERT INTO boots (boot_id, started, durable_seq) VALUES (?, ?, 0)",
                (f"ahead{i}", ahead + i),
            )
    store = _store(tmp_path)
    try:
        seq = store.add(_inference(1))
        assert store.flush(10)
    finally:
        store.stop()
    with sqlite3.connect(path) as db:
        marks = durable_marks(db)
    assert marks.get(store.boot_id) == seq
    assert len(marks) == MAX_BOOTS
    assert list(marks)[-1] == store.boot_id  # the newest, whatever the clocks said
    assert "ahead0" not in marks  # the oldest process registered is the one forgotten


def test_forget_finds_a_subject_by_index_without_scanning_the_buffer(tmp_path: Path) -> None:
    """forget holds the writer: each of its statements finds the subject's rows through
    an index (subject, owner or unit), never by reading every inference."""
    path = tmp_path / "telemetry.db"
    store = _store(tmp_path)
    try:
        for i in range(200):
            store.add(_inference(i))
        theirs = [
            InferenceRecord("by-subject", "m", "1", 200, 0, 0, 0, 1, time.time(), subject_hash="s"),
            InferenceRecord("by-owner", "m", "1", 200, 0, 0, 0, 1, time.time(), owner_hash="s"),
            InferenceRecord("by-unit", "m", "1", 200, 0, 0, 0, 1, time.time(), unit_hash="s"),
        ]
        for record in theirs:
            store.add(record)
        store.add(FeedbackRecord("by-owner", "7", 1, time.time()))
        assert store.flush(10)
    finally:
        store.stop()
    statements: list[str] = []
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.set_trace_callback(statements.append)
        removed = maintenance.forget_subject_rows(conn, "s", "ae")
        conn.set_trace_callback(None)
        plans = {
            sql: [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
            for sql in statements
            if "inferences" in sql and sql.lstrip().upper().startswith(("DELETE", "SELECT"))
        }
        left = conn.execute("SELECT request_id FROM inferences WHERE request_id LIKE 'by-%'")
        assert left.fetchall() == []
    finally:
        conn.close()
    assert removed == 4  # three inferences and the feedback on one of them
    assert plans, "forget ran no statement over inferences"
    for sql, plan in plans.items():
        scans = [step for step in plan if re.match(r"SCAN (TABLE )?inferences\b", step)]
        assert not scans, f"{sql!r} reads every inference: {plan}"


def test_a_buffer_from_before_boot_numbers_keeps_its_marks_in_order(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.db"
    _store(tmp_path).stop()
    with sqlite3.connect(path) as db:  # as buffers before 0.4 had it
        db.execute("DROP TABLE boots")
        db.execute("CREATE TABLE boots (boot_id TEXT PRIMARY KEY, started FLOAT, durable_seq INT)")
        db.execute("INSERT INTO boots VALUES ('second', 2.0, 7), ('first', 1.0, 5)")
    store = _store(tmp_path)
    store.stop()
    with sqlite3.connect(path) as db:
        marks = durable_marks(db)
    assert list(marks.items())[:2] == [("first", 5), ("second", 7)]
    assert list(marks)[-1] == store.boot_id


def test_a_write_chunk_never_holds_more_than_its_share_of_the_wal_budget(
    tmp_path: Path,
) -> None:
    # Inference records go into a chunk unmeasured while even their largest would fit;
    # whatever the mix, a chunk's measured size stays within a quarter of the budget.
    budget = 64 * 1024
    store = TelemetryStore(
        tmp_path / "telemetry.db", "ae", 10_000, 5000, 0.01, wal_budget_bytes=budget
    )
    wide = bounded(_inference(0)._replace(request_id="r" * 10_000, error="e" * 10_000))
    records = [wide if i % 7 == 0 else _inference(i) for i in range(600)]
    records[300:300] = [FeedbackRecord("req-1", "x" * 5000, None, time.time())] * 3
    batch = deque(enumerate(records, 1))
    taken = []
    while batch:
        chunk = store._take_chunk(batch)
        assert len(chunk) == 1 or sum(_approx_bytes(r) for _, r in chunk) <= budget / 4
        taken.extend(chunk)
    assert [seq for seq, _ in taken] == list(range(1, len(records) + 1))
    store.wal_budget_bytes = 8 * 1024 * 1024
    light = deque(enumerate([_inference(i) for i in range(1000)], 1))
    assert len(store._take_chunk(light)) == 1000 and not light  # the usual batch goes whole
