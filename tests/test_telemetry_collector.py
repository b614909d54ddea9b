"""A hostile or struggling collector (a real OTLP/HTTP receiver on loopback) cannot make
the box lose records silently, drain its buffer at full speed, or retry too soon."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx

from tests.serving import RunningServer, free_port, run_server
from tests.test_telemetry_sync import _config, _post, _send, _state, receiver
from tests.waiting import wait_until


def _status(server: RunningServer) -> dict:
    return httpx.get(f"{server.url}/api/telemetry/status", timeout=10).json()


def _rows(state_dir: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(f"file:{state_dir / 'telemetry.db'}?mode=ro", uri=True) as db:
        return db.execute(sql).fetchall()


def test_a_collector_rejecting_everything_trips_the_breaker_and_dead_letters(
    tmp_path: Path,
) -> None:
    """Issue 21 item 5: 400 to every upload. After `breaker_failures` records refused in
    a row the breaker opens and an alert fires; the refused records are marked rejected
    (never synced) and listed in the dead-letter table; the rest wait in the buffer."""
    with receiver(tmp_path / "received.txt") as url:
        _post(url, {"mode": "reject"})
        config = _config(url, breaker_failures=3, breaker_open_s=3600.0, batch_records=50)
        with run_server(tmp_path, config) as server:
            _send(server, 40)
            wait_until(
                lambda: _status(server)["dropped"].get("inferences/upstream_rejected", 0) >= 3,
                30,
                "three refused records",
            )
            status = wait_until(
                lambda: (s := _status(server))["upstream"].get("breaker_open") and s,
                30,
                "the breaker to open",
            )
            posts = _state(url)["requests"]
            metrics = httpx.get(f"{server.url}/metrics").text
            assert _state(url)["requests"] == posts  # nothing sent while the breaker is open
        state_dir = tmp_path / "state"
        synced = _rows(state_dir, "SELECT count(*) FROM inferences WHERE synced = 1")[0][0]
        assert synced == 0, "refused records must never look delivered"
        rejected = _rows(state_dir, "SELECT record_id FROM inferences WHERE synced = 2")
        dead = _rows(state_dir, "SELECT record_id, status FROM dead_letters")
    assert posts <= 12  # isolating the first refused record, then one each
    assert len(rejected) == 3
    assert sorted(dead) == sorted((r, 400) for (r,) in rejected)
    assert status["dead_letters"]["records"] == 3
    assert status["dropped"]["inferences/upstream_rejected"] == 3
    assert status["upstream"]["rejected_in_row"] == 3
    assert "upstream_rejecting" in status["alerts_firing"]
    assert "edgeserve_telemetry_dead_letter_records 3.0" in metrics
    assert "edgeserve_sync_breaker_open 1.0" in metrics
    assert 'edgeserve_alerts_firing{rule="upstream_rejecting"} 1.0' in metrics


def test_retry_after_above_backoff_max_is_honoured_up_to_the_ceiling(tmp_path: Path) -> None:
    """Issue 21 item 9: a 429 asking for 20 minutes is not retried after backoff_max_s."""
    with receiver(tmp_path / "received.txt") as url:
        _post(url, {"mode": "throttle", "retry_after": "1200"})
        with run_server(tmp_path, _config(url)) as server:  # backoff_max_s = 0.5
            _send(server, 5)
            status = wait_until(
                lambda: (s := _status(server))["upstream"]["failures"] >= 1 and s,
                30,
                "a throttled upload",
            )
            assert _state(url)["requests"] == 1
    assert status["upstream"]["retry_in_s"] >= 1199


def test_records_carry_the_semantic_convention_record_uid(tmp_path: Path) -> None:
    """Issue 21 item 8: `log.record.uid` for dedupe by any collector, with the old
    `edgeserve.record_id` alias for one release."""
    with receiver(tmp_path / "received.txt") as url:
        with run_server(tmp_path, _config(url)) as server:
            _send(server, 5)
            wait_until(lambda: _state(url)["accepted_records"] >= 5, 30, "5 records upstream")
        assert _state(url)["uid_records"] == _state(url)["accepted_records"]


def test_catch_up_after_an_outage_is_paced(tmp_path: Path) -> None:
    """Issue 21 item 6: 200 records wait out an outage; once the collector is back they
    go in batches of at most 50, each followed by the pause its records and bytes take at
    the configured rates (the pauses are the product's schedule, not a clock reading)."""
    port = free_port()  # known before the collector starts: the box sends to it while it is down
    collector = f"http://127.0.0.1:{port}"
    config = _config(collector, catch_up_records_per_s=100.0, catch_up_bytes_per_s=4096.0)
    with run_server(tmp_path, config) as server:
        _send(server, 200)  # nothing listens on the port yet
        wait_until(lambda: _status(server)["upstream"]["failures"] >= 1, 30, "a failed upload")
        with receiver(tmp_path / "received.txt", port) as url:
            wait_until(lambda: _state(url)["accepted_records"] >= 200, 60, "the backlog upstream")
            status = _status(server)
            posts = _state(url)["posts"]
    assert all(records <= 50 for records, _ in posts)
    sent = status["upstream"]["sent_records"]
    assert sent >= 200
    # Every upload but the last is followed by its pause before the next one goes.
    assert status["upstream"]["paced_s"] >= sent / 100.0
