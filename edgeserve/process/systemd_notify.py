"""sd_notify without libsystemd: readiness, reload, stop and watchdog messages to systemd.

Under `Type=notify` systemd passes `$NOTIFY_SOCKET` (a path, or `@name` for the abstract
namespace) and, with `WatchdogSec=`, `$WATCHDOG_USEC`. Every function here is a no-op that
returns False when the variable is unset, so the server calls them unconditionally.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

from edgeserve.protocol.integers import parse_uint

log = logging.getLogger(__name__)

__all__ = [
    "notify",
    "ready",
    "reloading",
    "run_watchdog",
    "status",
    "stopping",
    "watchdog_interval_s",
]


def _address(raw: str) -> str | bytes:
    """An `@name` socket lives in the Linux abstract namespace: a leading NUL byte."""
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    return raw


def notify(state: str) -> bool:
    """Send one sd_notify datagram (e.g. "READY=1"); False if not under systemd or it failed.

    Never raises: a lost notification must not take the server down."""
    raw = os.environ.get("NOTIFY_SOCKET", "")
    if not raw or raw[0] not in "/@":
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(raw))
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify failed state=%s error=%s", state.split("=", 1)[0], exc.strerror)
        return False
    return True


def ready(status_text: str = "") -> bool:
    """Models are loaded and the port is bound: systemd may start dependants now."""
    extra = f"\nSTATUS={status_text}" if status_text else ""
    return notify(f"READY=1\nMAINPID={os.getpid()}{extra}")


def reloading() -> bool:
    """A SIGHUP reload began; call ready() when it is done (systemd >= 253 reads the time)."""
    monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")


def stopping() -> bool:
    """Shutdown began (draining in-flight requests)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Free-form line shown by `systemctl status`."""
    return notify(f"STATUS={text}")


def watchdog_interval_s() -> float | None:
    """Seconds between keep-alive pings, half the `WatchdogSec=` deadline; None if unset.

    `$WATCHDOG_PID`, when set, must name this process (systemd sets it for the main PID)."""
    usec = parse_uint(os.environ.get("WATCHDOG_USEC"))
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return usec / 2_000_000


async def run_watchdog(interval_s: float | None = None) -> None:
    """Ping `WATCHDOG=1` forever from the event loop, so a wedged loop gets the service
    restarted. Returns at once when no watchdog is configured; cancel it to stop."""
    interval_s = interval_s if interval_s is not None else watchdog_interval_s()
    if interval_s is None:
        return
    log.info("systemd watchdog on interval_s=%.1f", interval_s)
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval_s)
