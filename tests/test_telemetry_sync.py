"""Telemetry reaches a real OTLP receiver at least once through outages, errors and
slowness, and never leaves the allow-listed hosts."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgeserve.config.schema import ConfigError, parse_section
from edgeserve.telemetry import maintenance
from edgeserve.telemetry.records import EventRecord, FeedbackRecord, InferenceRecord
from edgeserve.telemetry.service import build_telemetry
from edgeserve.telemetry.settings import TelemetrySettings, UpstreamSettings
from edgeserve.telemetry.sync import UpstreamSync
from tests.otlp_receiver import receiver
from tests.serving import MODELS, RunningServer, free_port, run_server
from tests.telemetry_model_child import CAP, open_store
from tests.telemetry_model_child import record as model_record
from tests.waiting import wait_until, wait_until_async

ROW = np.load(MODELS / "digits" / "heldout.npz")["X"][0].tolist()
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}


def _config(collector: str, **extra: object) -> str:
    """Upstream settings for a test sending to `collector` (a receiver's base URL);
    `extra` adds [telemetry.upstream] keys or replaces the defaults here."""
    upstream = {
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.5,
        "breaker_failures": 1000,
        "batch_records": 50,
        "timeout_s": 1.0,
        **extra,
    }
    lines = [
        "[auth]\nenabled = false\n[telemetry]\nmaintenance_interval_s = 0.5\n"
        "write_interval_ms = 20.0\n[telemetry.upstream]\n"
        f'url = "{collector}/v1/logs"\nallowed_hosts = ["127.0.0.1"]\n'
    ]
    lines += [f"{k} = {v!r}\n".replace("'", '"') for k, v in upstream.items()]
    return "".join(lines)


def _send(server: RunningServer, n: int) -> None:
    with httpx.Client(timeout=10) as client:
        for _ in range(n):
            assert client.post(f"{server.url}/v2/models/digits/infer", json=BODY).status_code == 200


def _record_ids(state_dir: Path) -> set[str]:
    with sqlite3.connect(f"file:{state_dir / 'telemetry.db'}?mode=ro", uri=True) as db:
        return {r[0] for r in db.execute("SELECT record_id FROM inferences")}


def _received(ids_file: Path) -> list[str]:
    return ids_file.read_text().split() if ids_file.exists() else []


def _post(url: str, doc: dict) -> None:
    httpx.post(url + "/control", json=doc, timeout=5).raise_for_status()


def _state(url: str) -> dict:
    return httpx.get(url + "/", timeout=5).json()


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    wait_until(condition, timeout_s, what)


def _sync_failures(server: RunningServer) -> int:
    return httpx.get(f"{server.url}/api/telemetry/status").json()["upstream"]["failures"]


@pytest.mark.slow
def test_every_record_arrives_through_down_error_throttle_slow_and_up(tmp_path: Path) -> None:
    port = free_port()  # known before the receiver starts: the box sends to it while it is down
    ids_file = tmp_path / "received.txt"
    with run_server(tmp_path, _config(f"http://127.0.0.1:{port}")) as server:
        _send(server, 60)  # receiver down: nothing listens on the port
        _wait(lambda: _sync_failures(server) >= 3, 30, "failed uploads while down")
        with receiver(ids_file, port) as url:
            _post(url, {"slow_s": 1.5})  # slow: longer than the client's 1 s timeout
            for mode in ("error", "throttle", "slow"):
                _post(url, {"mode": mode})
                _send(server, 60)
                _wait(lambda m=mode: _state(url)["by_mode"].get(m, 0) >= 2, 30, mode)
            _post(url, {"mode": "up"})
            _send(server, 60)
            produced: set[str] = set()

            def all_arrived() -> bool:
                nonlocal produced
                produced = _record_ids(tmp_path / "state")
                return len(produced) == 300 and produced <= set(_received(ids_file))

            _wait(all_arrived, 60, "every record upstream")
            # The slow answers came after the client gave up; they still count as received.
            _wait(lambda: _state(url)["in_flight"] == 0, 10, "slow answers to finish")
        received = _received(ids_file)
    assert len(produced) == 300
    assert set(received) == produced  # after dedupe by id: exactly once
    assert len(received) > len(produced)  # at least once: what timed out was sent again
    print(
        f"\nproduced={len(produced)} received={len(received)} "
        f"duplicates={len(received) - len(set(received))}"
    )


@pytest.mark.parametrize(
    ("encoding", "compression"), [("json", "gzip"), ("protobuf", "none"), ("protobuf", "gzip")]
)
def test_library_sync_sends_rows_and_metrics_with_token_region_and_encoding(
    tmp_path: Path, encoding: str, compression: str
) -> None:
    """The sync task alone (no server): every table's rows arrive as logs and the request
    aggregates as metrics, parsed by the official definitions, with the bearer token, the
    record ids and the data region."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    ids_file = tmp_path / "received.txt"

    metrics: dict = {}

    async def produce_and_sync(url: str) -> set[str]:
        nonlocal metrics
        settings = parse_section(
            TelemetrySettings,
            {
                "data_region": "ae-dxb",
                "write_interval_ms": 5.0,
                "upstream": {
                    "url": f"{url}/v1/logs",
                    "allowed_hosts": ["127.0.0.1"],
                    "encoding": encoding,
                    "compression": compression,
                    "bearer_token_file": str(token),
                    "batch_records": 7,
                    "backoff_initial_s": 0.05,
                    "backoff_max_s": 0.2,
                    "metrics_interval_s": 0.2,
                },
            },
            "telemetry",
        )
        telemetry = build_telemetry(settings, tmp_path / "state")
        await telemetry.start()
        for i in range(20):
            telemetry.record_inference(
                InferenceRecord(f"r{i}", "digits", "2", 200, 0.01, 0, 0, 1, time.time())
            )
        telemetry.record_event(EventRecord("purchase", 12.5, None, time.time()))
        telemetry.record_feedback(FeedbackRecord("r1", "3", None, time.time()))
        telemetry.record_audit("model.update", "digits", "ok")
        await telemetry.forget("someone")
        assert await telemetry.flush(10)

        def all_sent() -> bool:  # before stop() cuts an upload short
            nonlocal metrics
            metrics = _state(url)["metrics"]
            return (
                telemetry.sync.sent_records >= 24  # type: ignore[union-attr]
                and metrics.get("edgeserve.requests") == 20
            )

        await wait_until_async(all_sent, 30, "24 records and the metrics upstream", interval_s=0.05)
        await telemetry.stop()
        with sqlite3.connect(telemetry.store.path) as db:
            return {
                r[0]
                for table in ("inferences", "events", "feedback", "audit", "forget_requests")
                for r in db.execute(f"SELECT record_id FROM {table} WHERE synced = 1")
            }

    with receiver(ids_file) as url:
        synced = asyncio.run(produce_and_sync(url))
        state = _state(url)
    assert len(synced) == 24, state
    assert set(_received(ids_file)) == synced, state
    assert state["authorization"] == "Bearer s3cret"
    assert state["content_type"].startswith(
        "application/x-protobuf" if encoding == "protobuf" else "application/json"
    )
    assert state["resource"]["edgeserve.data_region"] == "ae-dxb"
    assert state["content_encoding"] == (None if compression == "none" else "gzip")
    # Aggregates went as OTLP metrics to the sibling /v1/metrics endpoint.
    assert metrics["edgeserve.requests"] == 20, metrics
    assert metrics["edgeserve.request.duration"] == 20, metrics


@pytest.mark.slow
def test_a_redirect_is_never_followed(tmp_path: Path) -> None:
    ids_file, elsewhere_file = tmp_path / "received.txt", tmp_path / "elsewhere.txt"
    with (
        receiver(ids_file) as url,
        receiver(elsewhere_file) as elsewhere,
        run_server(tmp_path, _config(url)) as server,
    ):
        _post(url, {"mode": "redirect", "location": f"{elsewhere}/v1/logs"})
        _send(server, 20)
        _wait(lambda: _state(url)["requests"] >= 3, 10, "retries to the allowed host")
        assert httpx.get(elsewhere).json()["requests"] == 0
        status = httpx.get(f"{server.url}/api/telemetry/status").json()
        assert status["upstream"]["sent_records"] == 0
    assert _received(elsewhere_file) == []


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        (
            {"url": "https://collector.example.com/v1/logs", "allowed_hosts": ["other.example"]},
            "host 'collector.example.com' is not in telemetry.upstream.allowed_hosts",
        ),
        ({"url": "https://collector.example.com/v1/logs"}, "is not in telemetry.upstream.allowed"),
        (
            {
                "url": "http://collector.example.com/v1/logs",
                "allowed_hosts": ["collector.example.com"],
            },
            "plain http only to a loopback address",
        ),
        ({"url": "ftp://x/v1/logs", "allowed_hosts": ["x"]}, "must be an http(s) URL"),
    ],
)
def test_upstream_off_the_allow_list_is_refused_at_start(upstream: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_section(TelemetrySettings, {"upstream": upstream}, "telemetry")


def test_an_alert_webhook_off_the_allow_list_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"host 'hooks\.example' is not in"):
        parse_section(
            TelemetrySettings,
            {
                "upstream": {"allowed_hosts": ["collector.example"]},
                "alerts": {"webhook_url": "https://hooks.example/alert"},
            },
            "telemetry",
        )


def test_server_with_a_non_listed_upstream_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "edgeserve.toml"
    config.write_text(
        '[telemetry.upstream]\nurl = "https://evil.example/v1/logs"\n'
        'allowed_hosts = ["collector.example"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "edgeserve", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "telemetry.upstream.url: host 'evil.example' is not in" in done.stderr


def test_a_record_the_collector_refuses_is_isolated_counted_and_passed_over(
    tmp_path: Path,
) -> None:
    ids_file = tmp_path / "received.txt"

    async def produce_and_sync(url: str) -> tuple[int, dict]:
        settings = parse_section(
            TelemetrySettings,
            {
                "write_interval_ms": 5.0,
                "upstream": {
                    "url": f"{url}/v1/logs",
                    "allowed_hosts": ["127.0.0.1"],
                    "batch_records": 16,
                },
            },
            "telemetry",
        )
        telemetry = build_telemetry(settings, tmp_path / "state")
        await telemetry.start()
        for i in range(40):
            telemetry.record_inference(
                InferenceRecord(
                    "poison" if i == 23 else f"r{i}",
                    "digits",
                    "2",
                    200,
                    0.01,
                    0,
                    0,
                    1,
                    time.time(),
                    top_score=float("nan") if i == 5 else 0.9,
                )
            )
        assert await telemetry.flush(10)
        sync = telemetry.sync
        assert sync is not None
        await wait_until_async(
            lambda: sync.sent_records >= 39, 30, "39 records sent", interval_s=0.05
        )
        drops = await telemetry._in_writer(maintenance.drop_counts)
        await telemetry.stop()
        return sync.sent_records, drops

    with receiver(ids_file) as url:
        _post(url, {"refuse_request_id": "poison"})
        sent, drops = asyncio.run(produce_and_sync(url))
    assert sent == 39  # the NaN score went too (proto3 JSON "NaN")
    assert len(set(_received(ids_file))) == 39
    assert drops == {("inferences", "upstream_rejected"): 1}


def test_a_firing_alert_is_posted_to_the_allow_listed_webhook(tmp_path: Path) -> None:

    async def fire(url: str) -> None:
        settings = parse_section(
            TelemetrySettings,
            {
                "upstream": {"allowed_hosts": ["127.0.0.1"]},
                "alerts": {"queue_saturation": 0.9, "webhook_url": f"{url}/hook"},
            },
            "telemetry",
        )
        telemetry = build_telemetry(settings, tmp_path, queue_fill=lambda: 0.97)
        telemetry.store.start()
        await telemetry.evaluate_alerts()
        await telemetry.stop()

    with receiver(tmp_path / "ids.txt") as url:
        asyncio.run(fire(url))
        hooks = _state(url)["hooks"]
    assert [(h["rule"], h["state"]) for h in hooks] == [("queue_saturation", "firing")]
    assert hooks[0]["value"] == pytest.approx(0.97)


def _load(server: RunningServer, name: str, stop: threading.Event, answered: list) -> None:
    with httpx.Client(timeout=5) as client:
        i = 0
        while not stop.is_set():
            rid = f"{name}-{i}"
            i += 1
            try:
                reply = client.post(
                    f"{server.url}/v2/models/digits/infer", json={**BODY, "id": rid}
                )
            except httpx.TransportError:
                return
            if reply.status_code == 200:  # a loaded box may shed with 429 (no record then)
                answered.append((int(reply.headers["x-telemetry-seq"].rpartition("-")[2]), rid))


@pytest.mark.slow
def test_sigkill_during_load_and_sync_loses_nothing_acknowledged_upstream(tmp_path: Path) -> None:
    """Kill -9 the server three times while it answers requests and uploads; every record
    acknowledged as durable is on disk after each kill, and once the box runs again
    every stored record reaches the collector (at least once; the cursor is never ahead
    of what the collector acknowledged)."""
    ids_file = tmp_path / "received.txt"
    guaranteed: set[str] = set()
    with receiver(ids_file) as url:
        for cycle in range(3):
            with run_server(tmp_path, _config(url)) as server:
                answered: list[tuple[int, str]] = []
                stop = threading.Event()
                threads = [
                    threading.Thread(target=_load, args=(server, f"c{cycle}t{k}", stop, answered))
                    for k in range(2)
                ]
                for t in threads:
                    t.start()
                before = _state(url)["accepted_records"]
                _wait(lambda b=before: _state(url)["accepted_records"] > b + 100, 30, "uploads")
                durable = httpx.get(f"{server.url}/api/telemetry/status").json()["durable_seq"]
                os.kill(server.process.pid, signal.SIGKILL)  # mid-load, mid-upload
                stop.set()
                for t in threads:
                    t.join()
                server.process.wait()
            acknowledged = {rid for seq, rid in answered if 0 < seq <= durable}
            assert acknowledged, "no record was acknowledged before the kill"
            guaranteed |= acknowledged
        with run_server(tmp_path, _config(url)):  # back online: the backlog drains

            def drained() -> bool:
                return _record_ids(tmp_path / "state") <= set(_received(ids_file))

            _wait(drained, 60, "the backlog to reach the collector")
    with sqlite3.connect(tmp_path / "state" / "telemetry.db") as db:
        stored = {r[0] for r in db.execute("SELECT request_id FROM inferences")}
    assert guaranteed <= stored, f"lost {len(guaranteed - stored)} acknowledged records"
    received = _received(ids_file)
    print(
        f"\nacknowledged={len(guaranteed)} stored={len(stored)} received={len(received)} "
        f"duplicates={len(received) - len(set(received))}"
    )


def _upstream(collector: str) -> UpstreamSettings:
    return parse_section(
        UpstreamSettings,
        {"url": f"{collector}/v1/logs", "allowed_hosts": ["127.0.0.1"]},
        "telemetry.upstream",
    )


@pytest.mark.parametrize("trim", ["size_cap", "retention"])
def test_rows_on_the_wire_are_delivered_and_never_counted_dropped(
    tmp_path: Path, trim: str
) -> None:
    """UpstreamSync chooses a batch; before it is posted, records keep coming and the
    size cap (or retention) trims the oldest rows. The batch on the wire must be
    delivered, kept as acknowledged, and not counted as dropped as well."""
    path = tmp_path / "telemetry.db"
    store = open_store(path)  # the cap checked after every commit, as the server does
    for i in range(50):
        store.add(model_record(i))
    assert store.flush(30)
    trims = {
        "size_cap": lambda c: maintenance.enforce_size_cap(store, c, CAP),
        "retention": lambda c: maintenance.apply_retention(
            store, c, {"inferences": 0.0}, now=time.time() + 3600
        ),
    }

    async def upload(sync: UpstreamSync) -> list[tuple[str, dict]]:
        rows = await sync._take(50)  # the batch is chosen ...
        for i in range(50, 450):  # ... and while it is on its way, the buffer fills up
            store.add(model_record(i))
        assert store.flush(30)
        store.submit(trims[trim]).result(30)
        async with sync._client() as client:
            await sync._send(client, rows)
        return rows

    try:
        with receiver(tmp_path / "received.txt") as url:
            rows = asyncio.run(upload(UpstreamSync(store, _upstream(url), "test")))
        store.submit(lambda c: None).result(30)
    finally:
        store.stop()
    sent = {row["record_id"] for _, row in rows}
    assert len(sent) == 50
    assert set(_received(tmp_path / "received.txt")) == sent
    with sqlite3.connect(path) as db:
        present = dict(db.execute("SELECT record_id, synced FROM inferences"))
        drops = maintenance.drop_counts(db)
    assert drops.get(("inferences", trim), 0) > 0, "the trim did not bite"
    assert {rid: present.get(rid) for rid in sent} == dict.fromkeys(sent, 1)
    # Every row gone was counted once (the cap checked after each commit may bite too).
    assert sum(drops.values()) == 450 - len(present)
