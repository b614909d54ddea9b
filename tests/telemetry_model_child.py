"""The writer of the model-based telemetry test in a real process, to be SIGKILLed.

    python tests/telemetry_model_child.py DBFILE SEED

Prints `boot <id>`, then forever: appends a random number of records, sometimes waits
for them to be durable, and prints `mark <durable_seq>` each time it has. This module
holds no tests; the store is built as `open_store` builds it for the in-process runs.
"""

from __future__ import annotations

import random
import sqlite3
import sys
import time
from pathlib import Path

from edgeserve.telemetry import maintenance
from edgeserve.telemetry.records import InferenceRecord
from edgeserve.telemetry.store import TelemetryStore

# A quarter of the smallest cap the config allows: the same mechanism, a quarter of the rows.
CAP = 256 * 1024


def record(i: int) -> InferenceRecord:
    """About 700 bytes a row: a few hundred rows reach the cap."""
    return InferenceRecord(
        f"{i:08d}" + "r" * 92, "digits", "1", 200, 0.001, 0.0, 0.0, 1, time.time(), error="e" * 500
    )


def open_store(path: Path) -> TelemetryStore:
    """A store as the server builds it: the cap checked after every committed batch."""

    def keep_under_cap(conn: sqlite3.Connection) -> None:
        if maintenance.over_trigger(path, CAP):
            maintenance.enforce_size_cap(store, conn, CAP, 8)

    store = TelemetryStore(
        path,
        "ae",
        100_000,
        2000,
        0.002,
        on_commit=keep_under_cap,
        wal_budget_bytes=maintenance.wal_budget(CAP),
    )
    store.start()
    return store


def main(path: Path, seed: int) -> None:
    rng = random.Random(seed)
    store = open_store(path)
    print("boot", store.boot_id, flush=True)
    i = 0
    while True:
        for _ in range(rng.randint(1, 80)):
            store.add(record(i))
            i += 1
        if rng.random() < 0.5:
            store.flush(30)
            print("mark", store.durable_seq, flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
