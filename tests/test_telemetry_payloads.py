"""Kept request bodies: sealed at rest, bound to their request, forgotten with their
subject, first to go under the size cap, never sent upstream."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from edgeserve.telemetry import maintenance
from edgeserve.telemetry.records import InferenceRecord
from edgeserve.telemetry.service import Telemetry, build_telemetry
from edgeserve.telemetry.settings import TelemetrySettings
from edgeserve.telemetry.sync import SEND_ORDER

BODY = b'{"inputs": [{"name": "input", "data": ["SECRET-PATIENT-NOTE"]}]}'


def _run(telemetry: Telemetry, *bodies: tuple[str, str | None]) -> None:
    async def go() -> None:
        await telemetry.start()
        for request_id, subject in bodies:
            telemetry.record_inference(
                InferenceRecord(
                    request_id,
                    "digits",
                    "2",
                    200,
                    0.01,
                    0,
                    0,
                    1,
                    time.time(),
                    subject_hash=telemetry.subject_hash(subject) if subject else None,
                )
            )
            assert telemetry.record_payload(request_id, "digits", "2", BODY) > 0
        await telemetry.stop()

    asyncio.run(go())


def _payload_row(path: Path, request_id: str) -> tuple[bytes, bytes]:
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT nonce, ciphertext FROM payloads WHERE request_id = ?", (request_id,)
        ).fetchone()


def test_a_kept_body_is_sealed_at_rest_and_opens_only_as_its_own_request(tmp_path: Path) -> None:
    telemetry = build_telemetry(TelemetrySettings(), tmp_path)
    _run(telemetry, ("req-1", None))
    path = telemetry.store.path
    for f in (path, Path(f"{path}-wal")):
        assert not f.exists() or b"SECRET-PATIENT-NOTE" not in f.read_bytes()
    row = _payload_row(path, "req-1")
    assert telemetry.read_payload("req-1", "digits", "2", row) == BODY
    with pytest.raises(InvalidTag):  # swapped onto another request id
        telemetry.read_payload("req-2", "digits", "2", row)
    nonce, sealed = row
    with pytest.raises(InvalidTag):  # one bit changed
        telemetry.read_payload("req-1", "digits", "2", (nonce, bytes([sealed[0] ^ 1]) + sealed[1:]))


def test_payloads_never_go_upstream_and_are_forgotten_with_their_subject(tmp_path: Path) -> None:
    assert "payloads" not in SEND_ORDER
    telemetry = build_telemetry(TelemetrySettings(), tmp_path)
    _run(telemetry, ("a-1", "alice"), ("b-1", "bob"))

    async def forget() -> int:
        again = build_telemetry(TelemetrySettings(), tmp_path)  # a restart: same keys
        again.store.start()
        removed = await again.forget("alice")
        again.store.stop()
        return removed

    assert asyncio.run(forget()) == 2  # the inference and its kept body
    with sqlite3.connect(telemetry.store.path) as db:
        left = [r[0] for r in db.execute("SELECT request_id FROM payloads")]
        unsynced = maintenance.count_unsynced(db)
    assert left == ["b-1"]
    assert unsynced == 2  # bob's inference and the forget request; payloads are not owed


def test_payloads_are_the_first_unsynced_rows_the_size_cap_drops(tmp_path: Path) -> None:
    telemetry = build_telemetry(TelemetrySettings(), tmp_path)
    _run(telemetry, *((f"r{i}", None) for i in range(3000)))
    store = build_telemetry(TelemetrySettings(), tmp_path).store
    size = maintenance.database_bytes(store.path)
    store.start()
    store.submit(lambda c: maintenance.enforce_size_cap(store, c, int(size * 0.7))).result()
    drops = store.submit(maintenance.drop_counts).result()
    store.stop()
    assert set(drops) == {("payloads", "size_cap")}
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT count(*) FROM inferences").fetchone()[0] == 3000
        kept = db.execute("SELECT count(*) FROM payloads").fetchone()[0]
    assert drops[("payloads", "size_cap")] == 3000 - kept
