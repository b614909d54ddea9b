"""Telemetry reaches a real OTLP receiver at least once through outages, errors and
slowness, and never leaves the allow-listed hosts."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgeserve.settings_schema import ConfigError, parse_section
from edgeserve.telemetry.settings import TelemetrySettings
from tests.serving import MODELS, RunningServer, free_port, run_server

RECEIVER = Path(__file__).with_name("otlp_receiver.py")
ROW = np.load(MODELS / "digits" / "heldout.npz")["X"][0].tolist()
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}


@contextmanager
def receiver(port: int, ids_file: Path) -> Iterator[str]:
    process = subprocess.Popen([sys.executable, str(RECEIVER), str(port), str(ids_file)])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(url + "/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        process.kill()
        process.wait()


def _config(port: int, **extra: object) -> str:
    lines = [
        "[auth]\nenabled = false\n[telemetry]\nmaintenance_interval_s = 0.5\n"
        "write_interval_ms = 20.0\n[telemetry.upstream]\n"
        f'url = "http://127.0.0.1:{port}/v1/logs"\nallowed_hosts = ["127.0.0.1"]\n'
        "backoff_initial_s = 0.05\nbackoff_max_s = 0.5\nbreaker_failures = 1000\n"
        "batch_records = 50\ntimeout_s = 1.0\n"
    ]
    lines += [f"{k} = {v!r}\n".replace("'", '"') for k, v in extra.items()]
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


@pytest.mark.slow
def test_every_record_arrives_through_down_error_throttle_slow_and_up(tmp_path: Path) -> None:
    port = free_port()
    ids_file = tmp_path / "received.txt"
    with run_server(tmp_path, _config(port)) as server:
        _send(server, 60)  # receiver down: nothing listens on the port
        time.sleep(1.0)
        with receiver(port, ids_file) as url:
            _post(url, {"mode": "error"})
            _send(server, 60)
            _post(url, {"mode": "throttle"})
            _send(server, 60)
            _post(url, {"mode": "slow"})  # slower than the client's 1 s timeout
            _send(server, 60)
            time.sleep(1.5)
            _post(url, {"mode": "up"})
            _send(server, 60)
            produced: set[str] = set()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                produced = _record_ids(tmp_path / "state")
                if len(produced) == 300 and produced <= set(_received(ids_file)):
                    break
                time.sleep(0.2)
        received = _received(ids_file)
    assert len(produced) == 300
    assert set(received) == produced  # after dedupe by id: exactly once
    assert len(received) >= len(produced)  # at least once (the slow phase resends)
    print(
        f"\nproduced={len(produced)} received={len(received)} "
        f"duplicates={len(received) - len(set(received))}"
    )


@pytest.mark.slow
def test_a_redirect_is_never_followed(tmp_path: Path) -> None:
    port, elsewhere_port = free_port(), free_port()
    ids_file, elsewhere_file = tmp_path / "received.txt", tmp_path / "elsewhere.txt"
    with (
        run_server(tmp_path, _config(port)) as server,
        receiver(port, ids_file) as url,
        receiver(elsewhere_port, elsewhere_file) as elsewhere,
    ):
        _post(url, {"mode": "redirect", "location": f"{elsewhere}/v1/logs"})
        _send(server, 20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and httpx.get(url).json()["requests"] < 3:
            time.sleep(0.1)
        assert httpx.get(url).json()["requests"] >= 3  # it kept trying the allowed host
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
