"""sd_notify messages reach a real AF_UNIX datagram socket, as systemd would receive them."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeserve.process import systemd_notify


@pytest.fixture(params=["path", "abstract"])
def notify_socket(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[socket.socket]:
    """A bound datagram socket standing in for systemd, named in $NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
    else:
        name = f"edgeserve-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    sock.settimeout(5)
    yield sock
    sock.close()


def receive(sock: socket.socket) -> dict[str, str]:
    lines = sock.recv(4096).decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_ready_sends_ready_and_main_pid(notify_socket: socket.socket) -> None:
    assert systemd_notify.ready("serving 2 models")
    message = receive(notify_socket)
    assert message == {"READY": "1", "MAINPID": str(os.getpid()), "STATUS": "serving 2 models"}


def test_reloading_carries_a_monotonic_timestamp(notify_socket: socket.socket) -> None:
    assert systemd_notify.reloading()
    message = receive(notify_socket)
    assert message["RELOADING"] == "1"
    assert int(message["MONOTONIC_USEC"]) > 0


def test_stopping_and_status(notify_socket: socket.socket) -> None:
    assert systemd_notify.stopping()
    assert receive(notify_socket) == {"STOPPING": "1"}
    assert systemd_notify.status("draining")
    assert receive(notify_socket) == {"STATUS": "draining"}


def test_without_notify_socket_every_call_is_a_quiet_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd_notify.ready() is False
    assert systemd_notify.notify("WATCHDOG=1") is False


def test_a_dead_socket_returns_false_instead_of_raising(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert systemd_notify.ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected_s"),
    [
        ("20000000", None, 10.0),  # WatchdogSec=20 -> ping every 10 s
        ("20000000", "self", 10.0),
        ("20000000", "1", None),  # meant for another process
        ("0", None, None),
        ("", None, None),
        ("junk", None, None),
        ("²", None, None),  # str.isdigit() says yes; int() then raised
    ],
)
def test_watchdog_interval_is_half_the_deadline(
    monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, expected_s: float | None
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert systemd_notify.watchdog_interval_s() == expected_s


def test_watchdog_task_pings_until_cancelled(notify_socket: socket.socket) -> None:
    async def run_briefly() -> None:
        task = asyncio.create_task(systemd_notify.run_watchdog(0.01))
        loop = asyncio.get_running_loop()
        for _ in range(3):
            message = await loop.run_in_executor(None, receive, notify_socket)
            assert message == {"WATCHDOG": "1"}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_briefly())


def test_watchdog_task_returns_at_once_without_watchdog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    asyncio.run(asyncio.wait_for(systemd_notify.run_watchdog(), timeout=5))
