"""A real server tells systemd (here: a test socket in $NOTIFY_SOCKET) that it is ready,
pings the watchdog, announces reloads and its stop — what `Type=notify` and `WatchdogSec=`
in packaging/systemd/edgeserve.service rely on."""

from __future__ import annotations

import signal
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.serving import run_server

pytestmark = pytest.mark.slow


class NotifySocket:
    """The systemd side: an abstract-namespace datagram socket collecting messages."""

    def __init__(self) -> None:
        self.name = f"edgeserve-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + self.name.encode())
        self.seen: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str, timeout_s: float = 60) -> dict[str, str]:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {key}={value} in {self.seen}"
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.seen.append(message)
            if message.get(key) == value:
                return message


def test_ready_watchdog_reload_and_stop_are_notified(tmp_path: Path) -> None:
    notify = NotifySocket()
    env = {"NOTIFY_SOCKET": "@" + notify.name, "WATCHDOG_USEC": "1000000"}
    try:
        with run_server(tmp_path, "[auth]\nenabled = false\n", env=env, wait_ready=False) as server:
            ready = notify.wait_for("READY", "1")
            # READY=1 comes only once the port answers and every model is warm.
            assert httpx.get(f"{server.url}/v2/health/ready", timeout=5).status_code == 200
            assert ready.get("MAINPID", str(server.process.pid)) == str(server.process.pid)

            notify.wait_for("WATCHDOG", "1", timeout_s=5)  # every 0.5 s at WATCHDOG_USEC=1 s

            server.process.send_signal(signal.SIGHUP)
            notify.wait_for("RELOADING", "1")
            notify.wait_for("READY", "1")

            server.process.send_signal(signal.SIGTERM)
            notify.wait_for("STOPPING", "1")
            assert server.process.wait(timeout=30) == 0
    finally:
        notify.sock.close()
