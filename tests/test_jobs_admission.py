"""Job admission under attack (issue 18): concurrent uploads cannot pass max_active_jobs,
and uploads cannot fill the disk (per-subject and total quotas, a free-space floor)."""

from __future__ import annotations

import contextlib
import json
import re
import select
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeserve.auth import issuer
from tests.serving import RunningServer, run_server
from tests.test_batch_support import digits_rows, model_repository, server_config
from tests.waiting import wait_until

JSONL = {"content-type": "application/x-ndjson"}
UPLOADS, LIMIT = 40, 16


def jsonl(rows: int) -> bytes:
    x, _ = digits_rows()
    return "".join(
        json.dumps({"input": x[i % len(x)].tolist()}) + "\n" for i in range(rows)
    ).encode()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_repository(tmp_path_factory.mktemp("repo"))


def _status(sock: socket.socket) -> int | None:
    """The status of the response waiting on `sock`, or None if none has arrived yet."""
    if not select.select([sock], [], [], 0)[0]:
        return None
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    return int(match.group(1)) if match else 0  # 0: closed without an answer


def test_concurrent_uploads_cannot_pass_max_active_jobs(tmp_path: Path, repo: Path) -> None:
    body = jsonl(10)
    half = len(body) // 2
    # a long body grace: the held uploads wait for the refusals, not for a rate bound
    extra = f"[jobs]\nmax_active_jobs = {LIMIT}\n[limits]\nbody_rate_grace_s = 600.0\n"
    server = "read_timeout_s = 600.0\n"
    with run_server(tmp_path, config_text=server_config(repo, extra, server)) as srv:
        head = (
            f"POST /api/jobs?model=digits HTTP/1.1\r\nhost: 127.0.0.1\r\n"
            f"content-type: application/x-ndjson\r\ncontent-length: {len(body)}\r\n\r\n"
        ).encode()
        socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(UPLOADS)]
        try:
            for s in socks:  # every upload is in flight before any of them is complete
                s.sendall(head + body[:half])
            statuses: dict[int, int] = {}

            def refused() -> bool:
                for i, s in enumerate(socks):
                    if i not in statuses and (status := _status(s)) is not None:
                        statuses[i] = status
                return len(statuses) >= UPLOADS - LIMIT

            # refusals come before the body is read; if none come, the uploads all went on
            # (the count below then says how many were accepted)
            with contextlib.suppress(AssertionError):
                wait_until(refused, 20, "the uploads over the limit to be refused")
            for i, s in enumerate(socks):
                if i not in statuses:
                    s.sendall(body[half:])
            for i, s in enumerate(socks):
                if i not in statuses:
                    s.settimeout(60)
                    statuses[i] = wait_until(
                        lambda s=s: _status(s), 60, "the held uploads to be answered"
                    )
        finally:
            for s in socks:
                s.close()
        counts = Counter(statuses.values())
        assert counts == {202: LIMIT, 429: UPLOADS - LIMIT}, counts
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert f'edgeserve_bounds_hit_total{{bound="jobs_active"}} {UPLOADS - LIMIT}' in metrics


@pytest.fixture(scope="module")
def quota_server(
    tmp_path_factory: pytest.TempPathFactory, repo: Path
) -> Iterator[tuple[RunningServer, Path]]:
    root = tmp_path_factory.mktemp("quota")
    issuer.init_keys(root / "state")
    config = (
        '[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "state"\n'
        f'[models]\nrepository = "{repo}"\nbackend = "onnxruntime"\n'
        "[auth]\nfailed_auth_burst = 0\n"
        "[jobs]\nmax_subject_bytes = 50000\n"
    )
    with run_server(root, config_text=config) as server:
        yield server, root


def _as(root: Path, subject: str) -> dict[str, str]:
    value = issuer.create_token(
        root / "state", ["infer"], 300, subject, "edgeserve-local", "edgeserve"
    )
    return {**JSONL, "Authorization": f"Bearer {value}"}


def test_a_subject_cannot_upload_past_its_disk_quota(
    quota_server: tuple[RunningServer, Path],
) -> None:
    server, root = quota_server
    url = f"{server.url}/api/jobs?model=digits"
    body = jsonl(90)
    assert 25_000 < len(body) < 50_000
    assert httpx.post(url, content=body, headers=_as(root, "bob")).status_code == 202
    second = httpx.post(url, content=body, headers=_as(root, "bob"))
    assert second.status_code == 507
    assert "max_subject_bytes" in second.json()["error"]
    # another subject still has its own quota
    assert httpx.post(url, content=body, headers=_as(root, "carol")).status_code == 202


@pytest.mark.parametrize(
    ("jobs_config", "bound"),
    [
        ("max_total_bytes = 20000", "max_total_bytes"),
        (f"min_free_bytes = {2**62}", "min_free_bytes"),
    ],
)
def test_uploads_cannot_fill_the_disk(
    tmp_path: Path, repo: Path, jobs_config: str, bound: str
) -> None:
    body = jsonl(90)

    def chunks() -> Iterator[bytes]:  # no content-length: refused while it arrives
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    with run_server(tmp_path, config_text=server_config(repo, f"[jobs]\n{jobs_config}\n")) as srv:
        reply = httpx.post(f"{srv.url}/api/jobs?model=digits", content=chunks(), headers=JSONL)
        assert reply.status_code == 507, reply.text
        assert bound in reply.json()["error"]
        assert not any((tmp_path / "state" / "jobs").glob("*/input.*"))
        assert httpx.get(f"{srv.url}/api/jobs").json()["jobs"] == []
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'edgeserve_bounds_hit_total{bound="jobs_disk"} 1' in metrics
