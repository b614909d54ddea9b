"""A model-based test of the telemetry buffer, built like Vector's disk-buffer tests: random
seeded sequences of append, flush, an upload through the real UpstreamSync to a loopback
OTLP receiver (records keep coming and the cap bites while it is on the wire), rejection,
eviction, crash and reopen run against the real SQLite file, and a simple reference model
says what must hold.

Invariants, checked after every step of every sequence:

1. every record at or below the durable mark its process reported (boot id + seq) is in
   the file, or was acknowledged upstream, or is counted as dropped;
2. nothing is counted twice: the drop counters equal exactly the records the model says
   went without delivery (size cap: never acknowledged, never rejected; rejection: once);
3. the database and its WAL stay within the cap plus `CAP_MARGIN`;
4. a process's durable mark on disk never falls below what it reported, and no record
   above it is in the file.

Most sequences "crash" in-process (the queue in memory is thrown away, what the writer
already holds is committed or not, as in a kill); a share run the writer in a real
process and SIGKILL it at a random moment.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edgeserve.config.schema import parse_section
from edgeserve.telemetry import maintenance
from edgeserve.telemetry.settings import UpstreamSettings
from edgeserve.telemetry.store import TelemetryStore, durable_marks, wal_bytes
from edgeserve.telemetry.sync import UpstreamSync
from tests.otlp_receiver import receiver
from tests.telemetry_model_child import CAP, open_store, record

LIMIT = CAP * (1 + maintenance.CAP_MARGIN)
DEAD_LETTERS = 8  # small, so that the dead-letter bound is exercised too
IN_PROCESS_SEEDS = range(200)
KILLED_SEEDS = range(1000, 1006)  # two kills each: 12 real SIGKILLs
CHILD = Path(__file__).with_name("telemetry_model_child.py")


@pytest.fixture
def buffer_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on tmpfs when there is one: the sequences are about what a process kill
    leaves (SQLite's own files, its locks and WAL), not about the disk's fsync latency,
    which would make 200 sequences take minutes."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="edgeserve-model-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@dataclass
class Model:
    """What the buffer promised: per record id, its boot and seq and what became of it."""

    records: dict[str, tuple[str, int]] = field(default_factory=dict)  # id -> (boot, seq)
    reported: dict[str, int] = field(default_factory=dict)  # boot -> mark the process said
    acked: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)

    def append(self, store: TelemetryStore, count: int, start: int) -> None:
        for i in range(count):
            seq = store.add(record(start + i))
            assert seq, "the queue is far from full"
            self.records[store.record_id(seq)] = (store.boot_id, seq)

    def report(self, store: TelemetryStore) -> None:
        self.reported[store.boot_id] = max(self.reported.get(store.boot_id, 0), store.durable_seq)


def check(model: Model, path: Path, store: TelemetryStore | None = None) -> None:
    """The invariants, against the file as it is now. The size is measured between two
    steps of the writer (a reader, this check's own included, can hold the WAL open
    while it reads; the writer's next step truncates it)."""
    if store is not None:
        store.submit(lambda c: None).result(30)
    size = maintenance.database_bytes(path)
    assert size <= LIMIT, f"files over the cap plus its margin: {size} (WAL {wal_bytes(path)})"
    db = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN")  # one snapshot: the writer may commit meanwhile
        marks = durable_marks(db)
        present = dict(db.execute("SELECT record_id, synced FROM inferences"))
        drops = maintenance.drop_counts(db)
        db.execute("COMMIT")
    finally:
        db.close()
    for boot, reported in model.reported.items():
        assert marks.get(boot, 0) >= reported, "a durable mark went backwards"
    durable = {r for r, (boot, seq) in model.records.items() if seq <= marks.get(boot, 0)}
    assert set(present) <= durable, "a row beyond its process's durable mark"
    vouched = {r for r, (boot, seq) in model.records.items() if seq <= model.reported.get(boot, 0)}
    missing = durable - set(present)
    # 1. What was vouched for is here, delivered, or counted (2. says counted exactly).
    assert vouched - set(present) <= missing
    for r in model.acked:
        assert present.get(r, 1) == 1, "an acknowledged row lost its mark"
    for r in model.rejected:
        assert present.get(r, 2) == 2, "a rejected row looks delivered or pending"
    # 2. Nothing counted twice, nothing lost uncounted.
    evicted_unsent = missing - model.acked - model.rejected
    assert drops.get(("inferences", "size_cap"), 0) == len(evicted_unsent)
    assert drops.get(("inferences", "upstream_rejected"), 0) == len(model.rejected)
    assert set(drops) <= {("inferences", "size_cap"), ("inferences", "upstream_rejected")}


def _unsynced(store: TelemetryStore, n: int) -> list[tuple[int, str]]:
    return store.submit(
        lambda c: c.execute(
            "SELECT seq, record_id FROM inferences WHERE synced = 0 ORDER BY seq LIMIT ?", (n,)
        ).fetchall()
    ).result(30)


def _crash(store: TelemetryStore) -> None:
    """In-process kill: what is queued in memory is gone; a batch the writer already
    holds is committed or not, whichever it reaches first."""
    with store._lock:
        store._pending.clear()
    store.stop()


async def _post(sync: UpstreamSync, rows: list[tuple[str, dict]]) -> None:
    """What UpstreamSync does with a batch it took: post it, advance on the 2xx."""
    if rows:
        async with sync._client() as client:
            await sync._send(client, rows)


def run_sequence(seed: int, path: Path, upstream: UpstreamSettings, steps: int = 16) -> Model:
    rng = random.Random(seed)
    model = Model()
    store = open_store(path)
    counter = 0
    try:
        for _ in range(steps):
            op = rng.choices(
                ["append", "flush", "ack", "reject", "evict", "crash", "reopen"],
                [6, 3, 3, 1, 1, 1, 1],
            )[0]
            if op == "append":
                count = rng.randint(1, 150)
                model.append(store, count, counter)
                counter += count
                model.report(store)  # whatever the writer has reached so far
            elif op == "flush":
                assert store.flush(30)
                model.report(store)
            elif op == "ack":  # UpstreamSync takes the oldest unsent rows and posts them
                assert store.flush(30)
                model.report(store)
                sync = UpstreamSync(store, upstream, "model")
                rows = asyncio.run(sync._take(rng.randint(1, 100)))
                # While the upload is on the wire, records keep coming and the cap bites.
                count = rng.randint(0, 150)
                model.append(store, count, counter)
                counter += count
                store.submit(lambda c, s=store: maintenance.enforce_size_cap(s, c, CAP)).result(30)
                asyncio.run(_post(sync, rows))
                assert sync.sent_records == len(rows), "the receiver answers 2xx"
                model.acked |= {row["record_id"] for _, row in rows}
            elif op == "reject":  # the collector refused one record for good
                assert store.flush(30)
                model.report(store)
                for row in _unsynced(store, 1):
                    marked = store.submit(
                        lambda c, r=row, s=store: maintenance.dead_letter(
                            s, c, "inferences", r, 400, DEAD_LETTERS
                        )
                    ).result(30)
                    assert marked
                    model.rejected.add(row[1])
            elif op == "evict":
                store.submit(lambda c, s=store: maintenance.enforce_size_cap(s, c, CAP)).result(30)
            elif op == "crash":
                _crash(store)
                store = open_store(path)
            else:  # a clean stop and start
                store.stop()
                model.report(store)
                store = open_store(path)
            try:
                check(model, path, store)
            except AssertionError as exc:
                raise AssertionError(f"after {op}: {exc}") from exc
    finally:
        store.stop()
    check(model, path)
    return model


def test_two_hundred_seeded_sequences_keep_every_promise(buffer_dir: Path) -> None:
    cap_bit = 0
    with receiver(buffer_dir / "received.txt") as url:
        upstream = parse_section(
            UpstreamSettings,
            {"url": f"{url}/v1/logs", "allowed_hosts": ["127.0.0.1"]},
            "telemetry.upstream",
        )
        for seed in IN_PROCESS_SEEDS:
            path = buffer_dir / f"seed-{seed}" / "telemetry.db"
            try:
                run_sequence(seed, path, upstream)
            except AssertionError as exc:
                raise AssertionError(f"seed {seed}: {exc}") from exc
            with sqlite3.connect(path) as db:
                cap_bit += bool(maintenance.drop_counts(db).get(("inferences", "size_cap")))
    assert cap_bit >= len(IN_PROCESS_SEEDS) // 4, "too few sequences reached the size cap"


@pytest.mark.parametrize("seed", KILLED_SEEDS)
def test_sigkill_of_a_real_writer_keeps_every_promise(buffer_dir: Path, seed: int) -> None:
    """The child appends and flushes at random and prints each durable mark it reaches;
    the parent SIGKILLs it after a random number of marks, mid-append or mid-commit,
    then reopens the file and checks the same invariants."""
    rng = random.Random(seed)
    path = buffer_dir / "telemetry.db"
    model = Model()
    for _ in range(2):  # kill, reopen, kill again: marks of both processes must hold
        child = subprocess.Popen(
            [sys.executable, str(CHILD), str(path), str(rng.randrange(1 << 30))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        boot = child.stdout.readline().split()[1]
        for _ in range(rng.randint(1, 12)):
            line = child.stdout.readline().split()  # "mark <seq>": durable, as the status says
            if not line:
                break
            model.reported[boot] = int(line[1])
            assert maintenance.database_bytes(path) <= LIMIT
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        # The child numbered records 1, 2, ... in order: the model knows their ids.
        with sqlite3.connect(path) as db:
            handed_out = durable_marks(db).get(boot, 0) + 2000
        model.records.update({f"{boot}-{s}": (boot, s) for s in range(1, handed_out + 1)})
        store = open_store(path)  # reopen: a new process, a new boot
        store.stop()
        check(model, path)
