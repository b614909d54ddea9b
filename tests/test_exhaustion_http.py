"""Connections held without (or with) a token cannot exhaust the box (issue 18).

Each test is the attack, through a real `edgeserve serve` process on loopback: a body
trickled just inside `read_timeout_s`, an anonymous login body trickled the same way,
hundreds of slow sockets under a low `ulimit -n`, and an idle TLS handshake. Each bound
must answer fast (408, 503, or a close) and be counted on /metrics.
"""

from __future__ import annotations

import contextlib
import re
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving import MODELS, RunningServer, run_server, wait_until_ready
from tests.test_tls_server import config_text, make_self_signed_with_cli, trusting, wait_ready

WAIT_S = 30.0  # how long a test waits for the server to act (a deadline, never asserted)


def trickle_until_answered(port: int, head: bytes, path_label: str) -> tuple[bytes, float]:
    """Send `head`, then one body byte every 0.3 s (well inside read_timeout_s) until the
    server answers or closes; returns what it sent back and the seconds it held us."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(head)
        start = time.monotonic()
        sock.settimeout(0.3)  # the pace of the trickle
        reply = b""
        while time.monotonic() - start < WAIT_S:
            with contextlib.suppress(OSError):  # the server closed: read what it said
                sock.sendall(b"0")
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            reply += data
        held_s = time.monotonic() - start
    print(f"{path_label}: held {held_s:.1f}s reply={reply[:40]!r}")
    return reply, held_s


def bounds_hit(server: RunningServer, bound: str, headers: dict[str, str] | None = None) -> float:
    text = httpx.get(server.url + "/metrics", headers=headers or {}, timeout=10).text
    found = re.search(rf'^edgeserve_bounds_hit_total{{bound="{bound}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def config(tmp_path: Path, server_keys: str = "", rest: str = "") -> str:
    """A full config: `server_keys` go in [server], `rest` after it."""
    return (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\nstate_dir = "{tmp_path / "state"}"\n'
        f'{server_keys}[models]\nrepository = "{MODELS}"\nload = ["digits"]\n{rest}'
    )


SLOW_BODY = "[limits]\nbody_rate_grace_s = 1.0\nmin_body_bytes_per_s = 1024\n"


@pytest.mark.parametrize("engine", ["uvicorn", "hypercorn"])
def test_slow_infer_body_is_refused_with_408_and_closed(tmp_path: Path, engine: str) -> None:
    """A body sent at ~3 bytes/s, each byte inside read_timeout_s: 408 once it falls
    behind the minimum rate, and the connection is closed."""
    text = config(tmp_path, f'engine = "{engine}"\n', "[auth]\nenabled = false\n" + SLOW_BODY)
    with run_server(tmp_path, config_text=text) as server:
        head = (
            b"POST /v2/models/digits/infer HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ncontent-length: 100000\r\n\r\n{"
        )
        reply, held_s = trickle_until_answered(server.port, head, f"infer body ({engine})")
        assert reply.startswith(b"HTTP/1.1 408"), f"held {held_s:.0f}s, reply {reply[:80]!r}"
        assert b"too slow" in reply
        assert bounds_hit(server, "body_deadline") >= 1


def test_anonymous_login_body_cannot_hold_a_connection(tmp_path: Path) -> None:
    """POST /dashboard/session carries its token in the body: without a token, a client
    trickling that body is cut off like any slow body (auth on)."""
    with run_server(tmp_path, config_text=config(tmp_path, "", SLOW_BODY)) as server:
        head = (
            b"POST /dashboard/session HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/x-www-form-urlencoded\r\ncontent-length: 4000\r\n\r\n"
            b"token="
        )
        reply, held_s = trickle_until_answered(server.port, head, "dashboard login body")
        assert reply.startswith(b"HTTP/1.1 408"), f"held {held_s:.0f}s, reply {reply[:80]!r}"


def test_oversized_login_body_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A login form is a few hundred bytes: a larger declared body is 413 at once."""
    with (
        run_server(tmp_path, config_text=config(tmp_path)) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock,
    ):
        sock.sendall(
            b"POST /dashboard/session HTTP/1.1\r\nhost: x\r\ncontent-length: 8000\r\n"
            b"content-type: application/x-www-form-urlencoded\r\n\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 413")


def slow_sockets(port: int, sources: list[str]) -> list[socket.socket]:
    """One connection per source address, each with a request head it never finishes."""
    opened = []
    for source in sources:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n")
        sock.setblocking(False)
        opened.append(sock)
    return opened


def wait_refused(sockets: list[socket.socket], at_least: int) -> int:
    """How many of `sockets` the server answered or closed, once `at_least` are (or
    WAIT_S has passed)."""
    refused: set[int] = set()
    deadline = time.monotonic() + WAIT_S
    while len(refused) < at_least and time.monotonic() < deadline:
        for i, sock in enumerate(sockets):
            if i in refused:
                continue
            try:
                if sock.recv(4096) is not None:
                    refused.add(i)  # an answer (503) or the close
            except BlockingIOError:
                pass
            except OSError:
                refused.add(i)
        time.sleep(0.05)  # polling interval of a condition with a deadline
    return len(refused)


@contextlib.contextmanager
def open_file_limit(limit: int) -> Iterator[None]:
    """Processes started inside the block inherit a soft `ulimit -n` of `limit`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


HOLDING = "read_timeout_s = 600.0\nrequest_head_timeout_s = 600.0\n"  # slow clients stay


def test_slow_sockets_under_a_low_ulimit_leave_health_answering(tmp_path: Path) -> None:
    """300 slow sockets from ten addresses against a server under `ulimit -n 300`: the
    connection cap (kept 64 under the limit) closes the longest-idle sockets for newcomers,
    so the process keeps descriptors and /v2/health/live is answered."""
    text = config(tmp_path, HOLDING, "[auth]\nenabled = false\n")
    with contextlib.ExitStack() as stack:
        with open_file_limit(300):
            server = stack.enter_context(run_server(tmp_path, config_text=text, wait_ready=False))
        wait_until_ready(server)
        sockets = slow_sockets(server.port, [f"127.0.0.{10 + i % 10}" for i in range(300)])
        for sock in sockets:
            stack.callback(sock.close)
        refused = wait_refused(sockets, 300 - (300 - 64))
        print(f"300 slow sockets: {300 - refused} held, {refused} refused")
        live = httpx.get(server.url + "/v2/health/live", timeout=10)
        assert live.status_code == 200
        assert refused >= 64
        assert bounds_hit(server, "connections") >= 64


def test_one_address_cannot_take_every_connection(tmp_path: Path) -> None:
    text = config(
        tmp_path, HOLDING + "max_connections_per_client = 4\n", "[auth]\nenabled = false\n"
    )
    with run_server(tmp_path, config_text=text) as server:
        sockets = slow_sockets(server.port, ["127.0.0.5"] * 10)
        try:
            refused = wait_refused(sockets, 6)
            assert refused == 6
            assert httpx.get(server.url + "/v2/health/live", timeout=10).status_code == 200
            assert bounds_hit(server, "connections_per_client") == 6
        finally:
            for sock in sockets:
                sock.close()


@pytest.mark.parametrize("engine", ["uvicorn", "hypercorn"])
def test_idle_tls_handshake_is_dropped(tmp_path: Path, engine: str) -> None:
    """A client that opens the TLS port and never says hello is closed after
    tls_handshake_timeout_s (uvicorn held it for asyncio's default of 60 s)."""
    state_dir, cert, key = make_self_signed_with_cli(tmp_path)
    text = config_text(state_dir, engine, cert, key, None).replace(
        "[models]", "tls_handshake_timeout_s = 1.0\n[models]"
    )
    with run_server(tmp_path, config_text=text, wait_ready=False) as server:
        wait_ready(server, f"https://127.0.0.1:{server.port}", trusting(cert))
        with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT_S) as sock:
            start = time.monotonic()
            try:
                closed = sock.recv(1) == b""
            except ConnectionResetError:
                closed = True
            except TimeoutError:
                closed = False
            print(f"idle TLS handshake ({engine}): held {time.monotonic() - start:.1f}s")
        assert closed, f"an idle TLS handshake was held for {WAIT_S:.0f}s"
