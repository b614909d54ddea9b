"""What a client can check from `x-telemetry-seq` alone holds across SIGKILL and restart,
every answer that leaves a record carries it, and a corrupt buffer is quarantined loudly."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import httpx
import numpy as np

from tests.serving import MODELS, RunningServer, run_server
from tests.waiting import wait_until

ROW = np.load(MODELS / "digits" / "heldout.npz")["X"][0].tolist()
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}


def vouched(header: str, status: dict) -> bool:
    """The client's check, from the header and the status alone (README, Telemetry):
    `x-telemetry-seq: <boot>-<seq>` is durable once the status's `durable[<boot>]` >= seq."""
    boot, _, seq = header.rpartition("-")
    if not boot:  # a bare number names no process: the status's own durable_seq is all there is
        return int(seq) <= status["durable_seq"]
    return int(seq) <= status.get("durable", {}).get(boot, 0)


def _infer(server: RunningServer, n: int, prefix: str) -> list[tuple[str, str]]:
    answered = []
    with httpx.Client(timeout=10) as client:
        for i in range(n):
            rid = f"{prefix}-{i}"
            reply = client.post(f"{server.url}/v2/models/digits/infer", json={**BODY, "id": rid})
            assert reply.status_code == 200, reply.text
            answered.append((reply.headers["x-telemetry-seq"], rid))
    return answered


def _status(server: RunningServer) -> dict:
    return httpx.get(f"{server.url}/api/telemetry/status", timeout=10).json()


def _stored_request_ids(state_dir: Path) -> set[str]:
    with sqlite3.connect(state_dir / "telemetry.db") as db:
        return {r[0] for r in db.execute("SELECT request_id FROM inferences")}


def test_durable_mark_never_vouches_for_records_lost_in_an_earlier_process(
    tmp_path: Path,
) -> None:
    """Issue 21 item 1: 25 records still in memory die with a SIGKILL; the next process
    numbers 30 more. The status must not vouch for any of the 25 lost ones."""
    slow = (
        "[auth]\nenabled = false\n[telemetry]\nwrite_interval_ms = 60000.0\n"
        "maintenance_interval_s = 3600.0\n"
    )
    with run_server(tmp_path, slow) as server:
        lost = _infer(server, 25, "first")  # nothing asks the writer to commit them
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
    fast = "[auth]\nenabled = false\n[telemetry]\nwrite_interval_ms = 20.0\n"
    with run_server(tmp_path, fast) as server:
        kept = _infer(server, 30, "second")

        def settled() -> dict | None:
            now = _status(server)
            return now if vouched(kept[-1][0], now) else None

        status = wait_until(settled, 30, "the second process's records to be durable")
    stored = _stored_request_ids(tmp_path / "state")
    vouched_for = {rid for header, rid in lost + kept if vouched(header, status)}
    assert {rid for _, rid in kept} <= vouched_for
    assert vouched_for <= stored, f"vouched for lost records: {sorted(vouched_for - stored)}"


def test_every_answer_that_leaves_a_record_carries_its_seq(tmp_path: Path) -> None:
    """Issue 21 item 4: refusals and failures that leave a record (and go upstream) say
    so, with the same check as a success; an answer that leaves none carries no header."""
    config = "[auth]\nenabled = false\n[telemetry]\nwrite_interval_ms = 20.0\n"
    with run_server(tmp_path, config) as server, httpx.Client(timeout=10) as client:
        url = f"{server.url}/v2/models/digits/infer"
        bad_shape = {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]
        }
        answers = {
            "invalid": client.post(url, json={**bad_shape, "id": "bad-shape"}),
            "not-json": client.post(url, content=b"{", headers={"x-request-id": "not-json"}),
            "unknown-version": client.post(
                f"{server.url}/v2/models/digits/versions/99/infer", json=BODY
            ),
        }
        assert answers["invalid"].status_code == 400
        assert answers["not-json"].status_code == 400
        assert answers["unknown-version"].status_code == 404
        for name in ("invalid", "not-json"):
            assert "x-telemetry-seq" in answers[name].headers, name
        assert "x-telemetry-seq" not in answers["unknown-version"].headers  # no record kept

        def settled() -> dict | None:
            now = _status(server)
            return now if vouched(answers["not-json"].headers["x-telemetry-seq"], now) else None

        wait_until(settled, 30, "the refusals' records to be durable")
    with sqlite3.connect(tmp_path / "state" / "telemetry.db") as db:
        rows = db.execute("SELECT record_id, status FROM inferences").fetchall()
    sent = {answers[n].headers["x-telemetry-seq"] for n in ("invalid", "not-json")}
    assert {record_id for record_id, _ in rows} == sent  # the header is the record's id
    assert [status for _, status in rows] == [400, 400]


def test_a_corrupt_buffer_is_quarantined_with_an_alert_and_its_rows_counted(
    tmp_path: Path,
) -> None:
    """Issue 21 item 7: a buffer whose schema is damaged is moved aside; the unsynced rows
    left in it are counted as dropped (`corrupt`), the alert fires, /metrics counts it."""
    config = "[auth]\nenabled = false\n[telemetry]\nwrite_interval_ms = 20.0\n"
    with run_server(tmp_path, config) as server:
        answered = _infer(server, 10, "before")
        wait_until(lambda: vouched(answered[-1][0], _status(server)), 30, "10 durable records")
    path = tmp_path / "state" / "telemetry.db"
    raw = path.read_bytes()
    at = raw.index(b'CREATE TABLE "drops"')  # a damaged schema: nothing opens it as it is
    path.write_bytes(raw[:at] + b"CREATE TABLX" + raw[at + 12 :])
    with run_server(tmp_path, config) as server:
        status = _status(server)
        metrics = httpx.get(f"{server.url}/metrics").text
        log = server.log()
    assert status["dropped"] == {"inferences/corrupt": 10}
    assert "telemetry_buffer_corrupt" in status["alerts_firing"]
    assert status["quarantined"]["unsynced_rows"] == 10
    assert "edgeserve_telemetry_quarantined_total 1.0" in metrics
    assert 'edgeserve_telemetry_dropped_total{reason="corrupt",table="inferences"} 10.0' in metrics
    assert "telemetry buffer unreadable" in log
    (aside,) = (tmp_path / "state").glob("telemetry.db.corrupt-*[0-9]")
    assert status["quarantined"]["file"] == aside.name
