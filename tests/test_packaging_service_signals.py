"""What the systemd unit relies on, against a real server process: `systemctl reload`
(SIGHUP) under load fails no request, and `systemctl stop` (SIGTERM) lets a request in
flight finish while refusing new connections."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.serving import RunningServer, run_server
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

AUTH_OFF = "[auth]\nenabled = false\n"
BODY = json.dumps(
    {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
).encode()


def wait_for_log(server: RunningServer, text: str, count: int = 1, timeout_s: float = 30) -> None:

    def logged() -> bool:
        assert server.process.poll() is None, server.log()
        return server.log().count(text) >= count

    wait_until(
        logged, timeout_s, lambda: f"{text!r} x{count} in log:\n{server.log()}", interval_s=0.02
    )


def refuses_connections(port: int, timeout_s: float = 10) -> bool:
    """True once a connect is refused (the listener closes just after it logs so)."""

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        except OSError:
            return True
        return False

    try:
        return wait_until(refused, timeout_s, "a refused connection", interval_s=0.02)
    except AssertionError:
        return False  # the caller asserts, with the server's log


def test_sighup_under_load_fails_no_request(tmp_path: Path) -> None:
    statuses: Counter[int | str] = Counter()
    stop = threading.Event()
    lock = threading.Lock()

    def client(url: str) -> None:
        with httpx.Client(timeout=30) as http:
            deadline = time.monotonic() + 60  # bounded even if the test body fails
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    status: int | str = http.post(
                        f"{url}/v2/models/digits/infer",
                        content=BODY,
                        headers={"content-type": "application/json"},
                    ).status_code
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                with lock:
                    statuses[status] += 1

    def answered() -> int:
        with lock:
            return sum(statuses.values())

    def wait_for_answers(count: int, timeout_s: float = 60) -> None:
        """Load is really running: `count` answers so far (a reload can finish before a
        client has sent anything, and then it proves nothing)."""

        def enough() -> bool:
            assert server.process.poll() is None, server.log()
            return answered() >= count

        wait_until(
            enough,
            timeout_s,
            lambda: f"{count} answers (only {answered()}: {statuses})",
            interval_s=0.02,
        )

    with run_server(tmp_path, AUTH_OFF) as server:
        workers = [threading.Thread(target=client, args=(server.url,)) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            for n in range(1, 4):
                wait_for_answers(answered() + 8)
                server.process.send_signal(signal.SIGHUP)
                wait_for_log(server, "reload done", count=n)
            wait_for_answers(answered() + 8)  # and it keeps answering after the last one
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
        assert server.process.poll() is None
    # 429 is the overload answer a loaded test box may give (the batcher refuses while the
    # event loop runs late); an error or a reset would be a failed request
    assert statuses[200] > 0 and set(statuses) <= {200, 429}, statuses


def test_sigterm_lets_a_request_in_flight_finish(tmp_path: Path) -> None:
    with run_server(tmp_path, AUTH_OFF) as server:
        # A request whose body is only half sent is in flight: the app is reading it.
        head = (
            f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
        ).encode()
        half = len(BODY) // 2
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head + BODY[:half])
            server.process.send_signal(signal.SIGTERM)
            wait_for_log(server, "Shutting down")
            # New connections are refused while the old one drains.
            assert refuses_connections(server.port), server.log()
            sock.sendall(BODY[half:])
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(65536)
                assert chunk, f"connection closed mid-request; log:\n{server.log()}"
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert server.process.wait(timeout=30) == 0
