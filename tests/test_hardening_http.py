"""Hostile requests against a real server with auth on: each gets a quick, clear 4xx,
nothing routes around the per-route scopes, and the server keeps serving afterwards."""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from edgeserve.auth.issuer import create_token, init_keys
from tests.serving import MODELS, RunningServer, run_server

ROW = np.load(MODELS / "digits" / "heldout.npz")["X"][0].tolist()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    tmp = tmp_path_factory.mktemp("hardening")
    init_keys(tmp / "state")
    token = create_token(
        tmp / "state", ["infer", "read"], 3600, "tester", "edgeserve-local", "edgeserve"
    )
    with run_server(
        tmp, "[auth]\nenabled = true\n[limits]\nmax_headers = 40\nmax_bytes_element = 1024\n"
    ) as running:
        yield running, token


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with a 2-second read timeout and a 3-second request-head deadline, for the
    slow-client cases."""
    tmp = tmp_path_factory.mktemp("impatient")
    port_config = (
        '[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'state_dir = "{tmp / "state"}"\nread_timeout_s = 2.0\nrequest_head_timeout_s = 3.0\n'
        f'[models]\nrepository = "{MODELS}"\n[auth]\nenabled = false\n'
    )
    with run_server(tmp, config_text=port_config) as running:
        yield running


def _infer(server: RunningServer, token: str | None, **kwargs: object) -> httpx.Response:
    headers = dict(kwargs.pop("headers", {}) or {})  # type: ignore[arg-type]
    if token:
        headers["Authorization"] = f"Bearer {token}"
    path = kwargs.pop("path", "/v2/models/digits/infer")
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=10, **kwargs)  # type: ignore[arg-type]


def _body(**override: object) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROW}
    tensor.update(override)
    return {"inputs": [tensor]}


def test_valid_token_is_served(secured: tuple[RunningServer, str]) -> None:
    server, token = secured
    assert _infer(server, token, json=_body()).status_code == 200


def test_health_needs_no_token_but_metadata_does(secured: tuple[RunningServer, str]) -> None:
    server, _ = secured
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    reply = httpx.get(f"{server.url}/v2/models/digits")
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"].startswith("Bearer")


HOSTILE = [
    ("no token", {}, False, 401),
    ("Host: evil", {"headers": {"Host": "evil"}}, False, 401),
    ("double slash path", {"path": "//v2/models/digits/infer"}, False, 404),
    ("encoded dot-dot", {"path": "/v2/models/%2e%2e/infer"}, False, 401),
    ("encoded dot-dot with token", {"path": "/v2/models/%2e%2e/infer"}, True, 404),
    ("shape bomb", {"json": _body(shape=[1000000000])}, True, 413),
    ("overflowing dimensions", {"json": _body(shape=[2**62, 2**62])}, True, 413),
    ("negative dimension", {"json": _body(shape=[-5, 64])}, True, 400),
    ("rank 64", {"json": _body(shape=[1] * 64)}, True, 400),
    (
        "deep nesting",
        {"content": b'{"inputs": [], "parameters": ' + b"[" * 200 + b"]" * 200 + b"}"},
        True,
        400,
    ),
    (
        "NaN",
        {
            "content": b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], '
            b'"data": [NaN]}]}'
        },
        True,
        400,
    ),
    (
        "million-digit integer",
        {
            "content": b'{"inputs": [{"name": "input", "datatype": "INT64",'
            b' "shape": [1], "data": [' + b"7" * 1_000_000 + b"]}]}"
        },
        True,
        400,
    ),
    (
        "huge BYTES element",
        {"json": _body(datatype="BYTES", shape=[1], data=["x" * 5000])},
        True,
        400,
    ),
    (
        "gzip body",
        {"content": gzip.compress(b"{}"), "headers": {"Content-Encoding": "gzip"}},
        True,
        415,
    ),
    (
        "wrong content type",
        {"content": b"<xml/>", "headers": {"Content-Type": "text/xml"}},
        True,
        415,
    ),
    ("header flood", {"headers": {f"x-h{i}": "v" for i in range(60)}}, True, 431),
    ("oversized body by header", {"content": b"x" * (17 * 1024 * 1024)}, True, 413),
]


@pytest.mark.parametrize(
    ("case", "request_kwargs", "with_token", "status"), HOSTILE, ids=[h[0] for h in HOSTILE]
)
def test_hostile_request_gets_a_quick_4xx(
    secured: tuple[RunningServer, str],
    case: str,
    request_kwargs: dict,
    with_token: bool,
    status: int,
) -> None:
    server, token = secured
    kwargs = dict(request_kwargs)
    reply = _infer(server, token if with_token else None, **kwargs)
    assert reply.status_code == status, reply.text
    if status != 404 or "error" in reply.text:
        assert "error" in reply.json()
    assert token not in reply.text
    assert "Traceback" not in reply.text
    assert "server" not in reply.headers
    assert reply.headers.get("cache-control") == "no-store"


def test_server_memory_stays_flat_after_the_hostile_matrix(
    secured: tuple[RunningServer, str],
) -> None:
    server, token = secured
    process = psutil.Process(server.process.pid)
    before = process.memory_info().rss
    for _ in range(3):
        for _case, kwargs, with_token, _status in HOSTILE:
            _infer(server, token if with_token else None, **dict(kwargs))
    after = process.memory_info().rss
    assert after - before < 64 * 1024 * 1024, f"RSS grew by {(after - before) >> 20} MiB"
    assert _infer(server, token, json=_body()).status_code == 200


def _raw_connection(server: RunningServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=15)


def _closed_within(sock: socket.socket, limit_s: float) -> float:
    """Seconds until the server closes or answers; fails past `limit_s`."""
    started = time.monotonic()
    sock.settimeout(limit_s)
    try:
        data = sock.recv(65536)
    except TimeoutError:
        pytest.fail(f"server kept a stalled connection open for over {limit_s}s")
    except ConnectionResetError:
        data = b""
    del data
    return time.monotonic() - started


def test_slowloris_headers_are_cut_off(impatient: RunningServer) -> None:
    with _raw_connection(impatient) as sock:
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        _closed_within(sock, 10.0)
    assert httpx.get(f"{impatient.url}/v2/health/ready").status_code == 200


def test_headers_trickling_inside_the_read_timeout_are_cut_off(impatient: RunningServer) -> None:
    """One header byte every 0.5 s never trips the 2 s read timeout; the head deadline
    (3 s from the first byte) closes the connection long before 30 bytes have gone."""
    with _raw_connection(impatient) as sock:
        sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        closed = False
        for _ in range(30):
            time.sleep(0.5)
            try:
                sock.sendall(b"a")
                sock.setblocking(False)
                closed = sock.recv(1) == b""
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            finally:
                sock.setblocking(True)
            if closed:
                break
        assert closed, "a trickling request head held the connection for 15 s"
    assert httpx.get(f"{impatient.url}/v2/health/ready").status_code == 200


def test_slow_body_is_cut_off(impatient: RunningServer) -> None:
    with _raw_connection(impatient) as sock:
        sock.sendall(
            b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"in'
        )
        _closed_within(sock, 10.0)
    assert httpx.get(f"{impatient.url}/v2/health/ready").status_code == 200


def test_idle_keep_alive_connection_is_closed(impatient: RunningServer, tmp_path: Path) -> None:
    with _raw_connection(impatient) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"200" in sock.recv(4096)
        _closed_within(sock, 15.0)


def _peak_rss(pid: int, reset: bool = False) -> int:
    """The process's peak resident memory (VmHWM) in bytes; `reset` first sets the peak to
    what it holds now (clear_refs 5), so that each measurement starts from there."""
    if reset:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_one_long_string_among_numbers_is_refused_without_a_string_array(
    secured: tuple[RunningServer, str], nested: bool
) -> None:
    """numpy reads a list holding one string among numbers as a string array as wide as
    the longest string for every element: a 2 MB body of 64 elements would take 512 MB
    before the "must be numbers" refusal (and a few hundred KB more, the unit's 2 GB)."""
    server, token = secured
    data: list = ["7" * (2 << 20), *ROW[1:]]
    tensor = _body(data=[data] if nested else data)
    before = _peak_rss(server.process.pid, reset=True)
    reply = _infer(server, token, json=tensor)
    assert reply.status_code == 400, reply.text
    assert "must be numbers" in reply.json()["error"]
    grown = _peak_rss(server.process.pid) - before
    assert grown < 128 << 20, f"peak RSS grew by {grown >> 20} MiB for one 2 MB request"
