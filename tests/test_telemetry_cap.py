"""The size cap trims the buffer in proportion to the excess (it never empties it) and
keeps the database and its WAL within the cap plus the documented margin while it does."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from edgeserve.telemetry import maintenance
from edgeserve.telemetry.records import InferenceRecord
from edgeserve.telemetry.service import build_telemetry
from edgeserve.telemetry.settings import TelemetrySettings

CAP = 1024 * 1024  # the smallest cap the config allows: where a fixed chunk hurt most


def _inference(i: int) -> InferenceRecord:
    return InferenceRecord(
        f"req-{i}", "digits", "1", 200, 0.001, 0.0001, 0.0005, 1, time.time(), error="x" * 200
    )


def _unsynced(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM inferences WHERE synced = 0").fetchone()[0]


def test_the_size_cap_trims_a_few_per_cent_and_files_stay_within_the_margin(
    tmp_path: Path,
) -> None:
    """Issue 21 items 2 and 3: 8,000 unsynced records through a 1 MiB buffer (upstream
    down), 100 at a time; maintenance runs between rounds. Once the cap bites, each
    trim keeps most of the backlog, and the files never exceed the cap plus 25 %."""
    settings = TelemetrySettings(max_db_bytes=CAP, write_interval_ms=5.0)
    telemetry = build_telemetry(settings, tmp_path)
    path = telemetry.store.path
    largest = 0
    done = threading.Event()

    def watch() -> None:  # the files as any observer sees them, at any moment
        nonlocal largest
        while not done.is_set():
            largest = max(largest, maintenance.database_bytes(path))

    counts: list[int] = []

    async def outage() -> None:
        await telemetry.start()
        for round_ in range(80):
            for i in range(100):
                telemetry.record_inference(_inference(round_ * 100 + i))
            assert await telemetry.flush(30)
            await telemetry.maintain_once()
            counts.append(_unsynced(path))
        await telemetry.stop()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        asyncio.run(outage())
    finally:
        done.set()
        watcher.join()
    peak = max(counts)
    assert peak < 8000, "the cap never bit"
    bitten = counts[counts.index(peak) :]
    # Each trim removes the excess and a few per cent more, never most of the backlog.
    assert min(bitten) >= 0.8 * peak, counts
    assert largest <= CAP * (1 + maintenance.CAP_MARGIN), (largest, CAP)
    print(f"\npeak_unsynced={peak} min_after={min(bitten)} largest_files={largest}")
