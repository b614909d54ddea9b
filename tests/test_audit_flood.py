"""The audit log under a flood (issue 18): refusals are aggregated by client and reason,
not by target, and the database has a size cap that prunes through the signed anchor."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from edgeserve.audit import chain
from edgeserve.auth import issuer
from tests.serving import RunningServer, run_server
from tests.test_auth_server import wait_until_live

pytestmark = pytest.mark.slow

FLOOD = 20_000
BATCH = 250


def _token(state_dir: Path, *scopes: str) -> str:
    return issuer.create_token(state_dir, scopes, 600, "walker", "edgeserve-local", "edgeserve")


def _pipelined(port: int, requests: list[bytes]) -> list[int]:
    """Send `requests` pipelined on one connection, BATCH at a time; their statuses."""
    statuses: list[int] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(60)
        buffer = b""
        for start in range(0, len(requests), BATCH):
            batch = requests[start : start + BATCH]
            sock.sendall(b"".join(batch))
            seen = 0
            while seen < len(batch):
                head_end = buffer.find(b"\r\n\r\n")
                if head_end < 0:
                    chunk = sock.recv(65536)
                    assert chunk, "the server closed the connection"
                    buffer += chunk
                    continue
                head = buffer[:head_end].decode("latin-1").split("\r\n")
                length = next(
                    int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length")
                )
                while len(buffer) < head_end + 4 + length:
                    chunk = sock.recv(65536)
                    assert chunk, "the server closed the connection"
                    buffer += chunk
                statuses.append(int(head[0].split()[1]))
                buffer = buffer[head_end + 4 + length :]
                seen += 1
    return statuses


def _server(tmp: Path) -> tuple[Path, Path]:
    state_dir = tmp / "state"
    issuer.init_keys(state_dir)
    empty = tmp / "models"
    empty.mkdir()
    return state_dir, empty


def _entries(state_dir: Path) -> list[dict]:
    conn = sqlite3.connect(chain.db_path(state_dir))
    try:
        rows = conn.execute("SELECT action, target, client, detail FROM entries").fetchall()
    finally:
        conn.close()
    return [
        {"action": a, "target": t, "client": c, "detail": orjson.loads(d)} for a, t, c, d in rows
    ]


def _verify(server: RunningServer) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeserve",
            "audit",
            "verify",
            "--json",
            "--config",
            str(server.config_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_20000_forbidden_paths_cost_a_few_audit_rows(tmp_path: Path) -> None:
    state_dir, empty = _server(tmp_path)
    # one window for the whole flood (60 s, the longest); the rows reach the disk at stop
    config = "[auth]\nfailed_auth_burst = 0\n[audit]\naggregate_window_s = 60.0\n"
    reader = _token(state_dir, "read")  # valid, but without the infer scope: 403
    requests = [
        (
            f"POST /v2/models/m{i}/infer HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {reader}\r\n"
            "content-length: 0\r\n\r\n"
        ).encode()
        for i in range(FLOOD)
    ]
    with run_server(tmp_path, config, repository=empty, wait_ready=False) as server:
        wait_until_live(server)
        statuses = _pipelined(server.port, requests)
        assert set(statuses) == {403} and len(statuses) == FLOOD
    forbidden = [e for e in _entries(state_dir) if e["action"] == "auth.forbidden"]
    assert sum(e["detail"]["count"] for e in forbidden) == FLOOD
    # one row per client and reason per window: a flood longer than 10 minutes adds more
    assert len(forbidden) <= 10, f"{len(forbidden)} rows for {FLOOD} refusals"
    assert forbidden[0]["target"] == "/v2/models/m0/infer"
    assert forbidden[0]["detail"]["targets"][:2] == ["/v2/models/m0/infer", "/v2/models/m1/infer"]
    assert forbidden[0]["detail"]["more_targets"] is True
    print(f"audit rows after {FLOOD} distinct 403s: {len(_entries(state_dir))}")


def test_the_audit_database_is_capped_and_stays_verifiable(tmp_path: Path) -> None:
    state_dir, empty = _server(tmp_path)
    config = "[auth]\nfailed_auth_burst = 0\n[audit]\nmax_db_bytes = 65536\n"
    admin = _token(state_dir, "admin")
    # admin requests are audited one row each (not aggregated): a real way to grow the log
    requests = [
        (
            f"POST /api/models/m{i}/rollback HTTP/1.1\r\nhost: x\r\n"
            f"authorization: Bearer {admin}\r\ncontent-length: 0\r\n\r\n"
        ).encode()
        for i in range(2000)
    ]
    with run_server(tmp_path, config, repository=empty, wait_ready=False) as server:
        wait_until_live(server)
        statuses = _pipelined(server.port, requests)
        assert len(statuses) == len(requests) and 200 not in statuses
        with httpx.Client(timeout=10) as client:  # the admin log is readable as ever
            assert (
                client.get(
                    f"{server.url}/api/audit", headers={"authorization": f"Bearer {admin}"}
                ).status_code
                == 200
            )
    conn = chain.connect(chain.db_path(state_dir), create=False)
    try:
        assert chain.used_bytes(conn) <= 65536
        rows = chain.row_count(conn)
    finally:
        conn.close()
    assert rows < len(requests)
    done = _verify(server)
    assert done.returncode == 0, done.stdout + done.stderr
    report = orjson.loads(done.stdout)
    assert report["ok"] and report["anchor_seq"] > 0 and report["signatures_checked"]
