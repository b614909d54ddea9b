"""Every telemetry record is bounded: ids and labels cut to their length, a byte cap per row.

A client's request id is its own text: a 1 MB id is answered (echoed unchanged, as
Triton does) but its telemetry row keeps only the first 128 characters, whatever the
transport, so 650 such messages cannot evict every real row through the size cap.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from edgeserve.telemetry.records import (
    ERROR_CHARS,
    INFERENCE_TEXT_FIELDS,
    LABEL_CHARS,
    MAX_INFERENCE_RECORD_BYTES,
    REQUEST_ID_CHARS,
    SUBJECT_HASH_CHARS,
    InferenceRecord,
    bounded,
)
from edgeserve.telemetry.service import Telemetry, build_telemetry
from edgeserve.telemetry.settings import TelemetrySettings
from tests.serving import MODELS, RunningServer
from tests.waiting import wait_until

ROW = np.load(MODELS / "digits" / "heldout.npz")["X"][0].tolist()
INPUTS = [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]
ONE_MB = 1_000_000


def _stored_ids(server: RunningServer, prefix: str) -> list[str]:
    """Request ids of the rows that start with `prefix`, once the writer has stored one."""
    path = server.config_path.parent / "state" / "telemetry.db"

    def rows() -> list[tuple]:
        with sqlite3.connect(path) as db:
            return db.execute(
                "SELECT request_id FROM inferences WHERE substr(request_id, 1, ?) = ?",
                (len(prefix), prefix),
            ).fetchall()

    return [r[0] for r in wait_until(rows, 10, f"a stored row with id {prefix}...")]


def _infer(server: RunningServer, request_id: str) -> httpx.Response:
    """POST one digits row, again after a 429 as a client would (a loaded box sheds)."""
    deadline = time.monotonic() + 30
    while True:
        reply = httpx.post(
            f"{server.url}/v2/models/digits/infer",
            json={"id": request_id, "inputs": INPUTS},
            timeout=30,
        )
        if reply.status_code != 429 or time.monotonic() > deadline:
            return reply
        time.sleep(float(reply.headers.get("retry-after", "0.1")))


def test_a_1mb_websocket_id_is_echoed_but_stored_cut_to_128_characters(
    server: RunningServer,
) -> None:
    request_id = "ws-1mb-" + "x" * (ONE_MB - 7)
    url = server.url.replace("http://", "ws://") + "/api/stream/digits"
    with connect(url, max_size=2 * ONE_MB) as ws:
        ws.send(json.dumps({"id": request_id, "inputs": INPUTS}))
        reply = json.loads(ws.recv(timeout=30))
    assert "error" not in reply, reply
    assert reply["id"] == request_id
    assert _stored_ids(server, "ws-1mb-") == [request_id[:REQUEST_ID_CHARS]]


def test_a_1mb_rest_id_is_echoed_but_stored_and_headed_cut_to_128_characters(
    server: RunningServer,
) -> None:
    request_id = "rest-1mb-" + "y" * (ONE_MB - 9)
    reply = _infer(server, request_id)
    assert reply.status_code == 200, reply.text
    assert reply.json()["id"] == request_id
    assert reply.headers["x-request-id"] == request_id[:REQUEST_ID_CHARS]
    assert _stored_ids(server, "rest-1mb-") == [request_id[:REQUEST_ID_CHARS]]


def test_feedback_for_a_long_id_joins_its_inference_and_its_label_is_cut(
    server: RunningServer,
) -> None:
    request_id = "fb-long-" + "z" * 192  # within feedback's 256 characters, over 128
    reply = _infer(server, request_id)
    assert reply.status_code == 200, reply.text
    sent = httpx.post(
        f"{server.url}/api/feedback", json={"request_id": request_id, "label": "7" * 5000}
    )
    assert sent.status_code == 202, sent.text
    path = server.config_path.parent / "state" / "telemetry.db"

    def joined_rows() -> list[tuple]:
        with sqlite3.connect(path) as db:
            return db.execute(
                "SELECT length(f.label) FROM feedback f JOIN inferences i "
                "ON f.request_id = i.request_id WHERE substr(i.request_id, 1, 8) = 'fb-long-'"
            ).fetchall()

    joined = wait_until(joined_rows, 10, "the feedback row joined to its inference")
    assert joined == [(LABEL_CHARS,)]


def _record(**fields: object) -> InferenceRecord:
    base = InferenceRecord("r", "digits", "2", 200, 0.003, 0.001, 0.0015, 1, time.time())
    return base._replace(**fields)


TEXT_FIELD_BOUNDS = [
    ("request_id", REQUEST_ID_CHARS),
    ("model", LABEL_CHARS),
    ("version", LABEL_CHARS),
    ("experiment", LABEL_CHARS),
    ("variant", LABEL_CHARS),
    ("prediction", LABEL_CHARS),
    ("subject_hash", SUBJECT_HASH_CHARS),
    ("error", ERROR_CHARS),
    ("owner_hash", SUBJECT_HASH_CHARS),
    ("unit_hash", SUBJECT_HASH_CHARS),
]
# what `ended` takes as keywords (request id, model and version come first, positionally)
KEYWORD_FIELD_BOUNDS = TEXT_FIELD_BOUNDS[3:]


def test_the_bounds_tested_here_are_every_text_field_of_a_record() -> None:
    # a text field added to InferenceRecord and _TEXT_BOUNDS must be added here too, so
    # that `ended` (whose records skip `bounded`) is tested to cut it
    fields = sorted(InferenceRecord._fields.index(name) for name, _ in TEXT_FIELD_BOUNDS)
    assert fields == sorted(INFERENCE_TEXT_FIELDS)


@pytest.mark.parametrize(("field", "limit"), TEXT_FIELD_BOUNDS)
def test_each_text_field_is_cut_to_its_bound(field: str, limit: int) -> None:
    long = _record(**{field: "é" * (limit + 1000)})
    cut = bounded(long)
    assert getattr(cut, field) == "é" * limit
    assert cut._replace(**{field: None}) == long._replace(**{field: None})  # the rest kept


@pytest.mark.parametrize(("field", "limit"), KEYWORD_FIELD_BOUNDS)
def test_ended_cuts_each_text_field_to_its_bound_as_it_makes_the_record(
    field: str, limit: int
) -> None:
    started = time.perf_counter()
    long = "é" * (limit + 1000)
    record = InferenceRecord.ended(
        "r" * 1000, "m" * 1000, "v" * 1000, 200, started, None, **{field: long}
    )
    assert getattr(record, field) == "é" * limit
    assert (record.request_id, record.model, record.version) == (
        "r" * REQUEST_ID_CHARS,
        "m" * LABEL_CHARS,
        "v" * LABEL_CHARS,
    )
    assert bounded(record) is record  # nothing left for the recorder to cut


def test_ended_keeps_text_within_its_bound_and_absent_labels_as_they_are() -> None:
    request_id = "id-" + "x" * (REQUEST_ID_CHARS - 3)
    record = InferenceRecord.ended(request_id, "digits", "2", 200, time.perf_counter(), None)
    assert record.request_id is request_id
    assert (record.experiment, record.variant, record.error, record.owner_hash) == (None,) * 4


def test_a_record_from_ended_is_stored_cut_to_its_bounds(tmp_path: Path) -> None:
    telemetry = build_telemetry(TelemetrySettings(), tmp_path)
    telemetry.store.start()
    long = "x" * ONE_MB
    record = InferenceRecord.ended(long, "digits", "2", 200, time.perf_counter(), None, error=long)
    seq = telemetry.record_ended(record)
    assert seq and telemetry.store.flush(10)
    telemetry.store.stop()
    with sqlite3.connect(telemetry.store.path) as db:
        row = db.execute("SELECT length(request_id), length(error) FROM inferences").fetchone()
    assert row == (REQUEST_ID_CHARS, ERROR_CHARS)


def test_a_record_within_bounds_is_queued_as_it_is() -> None:
    record = _record(experiment="exp", variant="a", subject_hash="0" * 32, prediction="7")
    assert bounded(record) is record


def test_text_of_the_wrong_type_is_stored_as_bounded_text() -> None:
    cut = bounded(_record(request_id=b"z" * 1000, version=2))  # type: ignore[arg-type]
    assert (cut.request_id, cut.version) == (str(b"z" * 1000)[:REQUEST_ID_CHARS], "2")


def test_ended_takes_the_timing_of_the_run_and_the_labels() -> None:
    class Run:
        queue_s, compute_s, batch_size = 0.002, 0.001, 4

    started = time.perf_counter()
    record = InferenceRecord.ended(
        "id", "digits", "2", 200, started, Run(), variant="b", experiment="e", shadow=True
    )
    assert record.total_s >= 0 and abs(record.time_unix - time.time()) < 60
    assert (record.queue_s, record.compute_s, record.batch_size) == (0.002, 0.001, 4)
    assert (record.variant, record.experiment, record.shadow) == ("b", "e", True)
    never_ran = InferenceRecord.ended("id", "digits", "2", 503, started, None)
    assert (never_ran.queue_s, never_ran.compute_s, never_ran.batch_size) == (0.0, 0.0, 0)
    with pytest.raises(TypeError):
        InferenceRecord.ended("id", "digits", "2", 200, started, None, varaint="typo")


def test_ended_builds_the_same_record_as_the_constructor() -> None:
    labels = {
        "experiment": "e",
        "variant": "b",
        "top_score": 0.5,
        "subject_hash": "s",
        "shadow": True,
        "error": "x",
        "prediction": "7",
        "owner_hash": "o",
        "unit_hash": "u",
    }
    record = InferenceRecord.ended("id", "digits", "2", 200, time.perf_counter(), None, **labels)
    assert type(record) is InferenceRecord and len(record) == len(InferenceRecord._fields)
    assert record == InferenceRecord(
        "id", "digits", "2", 200, record.total_s, 0.0, 0.0, 0, record.time_unix, **labels
    )


def test_a_stored_row_stays_under_the_byte_cap(tmp_path: Path) -> None:
    telemetry = build_telemetry(TelemetrySettings(), tmp_path)
    telemetry.store.start()
    wide = "\U0001f600" * ONE_MB  # 4 bytes a character in UTF-8
    record = InferenceRecord(
        wide, wide, wide, 200, 0.1, 0.1, 0.1, 1, time.time(), wide, wide, 0.5, wide, False,
        wide, wide,
    )  # fmt: skip
    seq = telemetry.record_inference(record)
    assert seq and telemetry.store.flush(10)
    telemetry.store.stop()
    text = ("request_id", "model", "version", "experiment", "variant", "subject_hash")
    text += ("error", "prediction")
    columns = ", ".join(f"length(CAST({c} AS BLOB))" for c in text)
    with sqlite3.connect(telemetry.store.path) as db:
        row = db.execute(f"SELECT {columns} FROM inferences").fetchone()
    sizes = dict(zip(text, row, strict=True))
    assert sizes["request_id"] == 4 * REQUEST_ID_CHARS
    assert sizes["error"] == 4 * ERROR_CHARS
    assert sizes["subject_hash"] == 4 * SUBJECT_HASH_CHARS
    assert sum(sizes.values()) + 8 * 8 <= MAX_INFERENCE_RECORD_BYTES


def _requests_total(telemetry: Telemetry) -> dict[tuple, float]:
    body, _ = asyncio.run(telemetry.render_metrics())
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "edgeserve_requests_total"
    }


def test_dropped_and_cut_records_count_exactly_once_in_the_metrics(tmp_path: Path) -> None:
    telemetry = build_telemetry(TelemetrySettings(queue_records=100), tmp_path)  # not started
    long_model = "m" * 1000
    seqs = [telemetry.record_inference(_record(model=long_model)) for _ in range(130)]
    assert seqs.count(0) == 30  # the queue is full: dropped, counted, not waited for
    telemetry.store.start()
    assert telemetry.store.flush(10)
    counts = _requests_total(telemetry)
    assert telemetry.store.flush(10)
    counts_again = _requests_total(telemetry)
    telemetry.store.stop()
    labels = (("model", "m" * LABEL_CHARS), ("status", "200"), ("variant", ""), ("version", "2"))
    assert counts == counts_again == {labels: 130}
