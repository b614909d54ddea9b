"""Telemetry over HTTP: Prometheus scrape, feedback, KPI events, forget, status."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serving import MODELS, RunningServer
from tests.waiting import wait_until

ROW = np.load(MODELS / "digits" / "heldout.npz")["X"][0].tolist()
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}


def _db(server: RunningServer) -> sqlite3.Connection:
    return sqlite3.connect(server.config_path.parent / "state" / "telemetry.db")


def _wait_durable(server: RunningServer, seq: int) -> None:
    wait_until(
        lambda: httpx.get(f"{server.url}/api/telemetry/status").json()["durable_seq"] >= seq,
        10,
        f"durable_seq >= {seq}",
        interval_s=0.02,
    )


def test_metrics_follow_prometheus_conventions(server: RunningServer) -> None:
    httpx.post(f"{server.url}/v2/models/digits/infer", json=BODY)
    text = httpx.get(f"{server.url}/metrics").text
    for family in (
        "edgeserve_requests_total",
        "edgeserve_request_duration_seconds_bucket",
        "edgeserve_queue_duration_seconds",
        "edgeserve_compute_duration_seconds",
        "edgeserve_batch_size_bucket",
        "edgeserve_queue_depth",
        "edgeserve_models_loaded",
        'edgeserve_requests_shed_total{model="digits"}',
        "edgeserve_telemetry_backlog_records",
        "edgeserve_sync_lag_seconds",
        "edgeserve_process_resident_memory_bytes",
        "edgeserve_process_cpu_seconds_total",
    ):
        assert family in text, family
    assert 'edgeserve_requests_total{model="digits",status="200",variant="",version="2"}' in text


def test_an_inference_is_recorded_without_its_payload(server: RunningServer) -> None:
    reply = httpx.post(
        f"{server.url}/v2/models/digits/infer",
        json={**BODY, "id": "rec-1"},
        headers={"x-user-id": "alice@example.com"},
    )
    _wait_durable(server, int(reply.headers["x-telemetry-seq"].rpartition("-")[2]))
    with _db(server) as db:
        row = db.execute(
            "SELECT model, version, status, subject_hash, top_score, data_region "
            "FROM inferences WHERE request_id = 'rec-1'"
        ).fetchone()
    model, version, status, subject_hash, top_score, region = row
    assert (model, version, status, region) == ("digits", "2", 200, "ae")
    assert subject_hash and "alice" not in subject_hash
    assert 0 < top_score <= 1
    raw = (server.config_path.parent / "state" / "telemetry.db").read_bytes()
    assert b"alice" not in raw


def test_failed_requests_are_recorded_with_their_status(server: RunningServer) -> None:
    reply = httpx.post(
        f"{server.url}/v2/models/digits/infer",
        json={
            "inputs": [{"name": "nope", "datatype": "FP32", "shape": [1], "data": [1]}],
            "id": "bad-1",
        },
    )
    assert reply.status_code == 400

    def stored_status() -> tuple | None:
        with _db(server) as db:
            return db.execute("SELECT status FROM inferences WHERE request_id = 'bad-1'").fetchone()

    assert wait_until(stored_status, 10, "the row of request bad-1") == (400,)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"request_id": "r1", "label": "3"}, 202),
        ({"request_id": "r1", "correct": True}, 202),
        ({"request_id": "never-served", "label": "3"}, 404),
        ({"request_id": "r1"}, 400),
        ({"label": "3"}, 400),
        ({"request_id": "r1", "correct": "yes"}, 400),
        ({"request_id": "x" * 300, "label": "3"}, 400),
        ([1, 2], 400),
    ],
)
def test_feedback_validates_its_body(
    server: RunningServer, body: object, status: int, request: pytest.FixtureRequest
) -> None:
    if isinstance(body, dict) and body.get("request_id") == "r1":  # a request served here
        served = f"fb-{request.node.callspec.id}"
        reply = httpx.post(f"{server.url}/v2/models/digits/infer", json={**BODY, "id": served})
        assert reply.status_code == 200
        body = {**body, "request_id": served}
    assert httpx.post(f"{server.url}/api/feedback", json=body).status_code == status


def test_a_request_is_labelled_once_and_the_first_label_stands(server: RunningServer) -> None:
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", json={**BODY, "id": "fb-once"})
    assert reply.status_code == 200
    labels = [
        httpx.post(f"{server.url}/api/feedback", json={"request_id": "fb-once", "label": label})
        for label in ("3", "4")
    ]
    assert [r.status_code for r in labels] == [202, 409]
    assert "already labelled" in labels[1].json()["error"]
    _wait_durable(server, labels[0].json()["seq"])
    with _db(server) as db:
        rows = db.execute("SELECT label FROM feedback WHERE request_id = 'fb-once'").fetchall()
    assert rows == [("3",)]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"name": "purchase", "value": 12.5, "unit": "u1"}, 202),
        ({"name": "click"}, 202),
        ({"name": "purchase", "value": "12"}, 400),
        ({"value": 1}, 400),
    ],
)
def test_events_validate_their_body(server: RunningServer, body: object, status: int) -> None:
    assert httpx.post(f"{server.url}/api/events", json=body).status_code == status


def test_forget_removes_a_subject_and_queues_the_request(
    server: RunningServer, tmp_path: Path
) -> None:
    for _ in range(3):
        reply = httpx.post(
            f"{server.url}/v2/models/digits/infer", json=BODY, headers={"x-user-id": "bob"}
        )
    _wait_durable(server, int(reply.headers["x-telemetry-seq"].rpartition("-")[2]))
    removed = httpx.post(f"{server.url}/api/telemetry/forget", json={"subject": "bob"}).json()
    assert removed["removed_rows"] >= 3
    with _db(server) as db:
        assert db.execute("SELECT count(*) FROM forget_requests").fetchone()[0] >= 1
