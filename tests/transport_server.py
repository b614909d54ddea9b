"""A real edgeserve process for the transport tests (HTTP and gRPC on loopback), and
reads of its real telemetry database. This module holds no tests."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.serving import MODELS, RunningServer, run_server
from tests.transports import digits_request, post
from tests.waiting import wait_until


@dataclass
class TransportServer:
    """A real edgeserve process with HTTP and gRPC on loopback."""

    http: RunningServer
    grpc_target: str

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def state_dir(self) -> Path:
        return self.http.config_path.parent / "state"

    def log(self) -> str:
        return self.http.log()


@contextmanager
def transport_server(
    tmp: Path, *, auth: bool = False, models: tuple[str, ...] = ("digits",)
) -> Iterator[TransportServer]:
    """One server on committed models (digits has versions 1 and 2), gRPC on; auth off
    unless asked (then with the failed-auth limiter off, so refusals stay 401s)."""
    auth_toml = "enabled = false\n" if not auth else "failed_auth_burst = 0\n"
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{tmp / "state"}"\n'
        f'[models]\nrepository = "{MODELS}"\nload = {json.dumps(list(models))}\n'
        f"[auth]\n{auth_toml}"
        "[telemetry]\nwrite_interval_ms = 20.0\n"
    )
    with run_server(tmp, config_text=config) as running:
        yield TransportServer(running, running.grpc_address())


def wait_durable(server: TransportServer, timeout_s: float = 15.0) -> None:
    """Wait until every telemetry record queued so far is in telemetry.db.

    A REST inference made now is queued after every record of the replies already
    received (each transport queues its record before it answers); its sequence number
    (`x-telemetry-seq`) is durable once `durable_seq` reaches it.
    """
    with httpx.Client(timeout=30) as client:
        reply = post(client, server.url + "/v2/models/digits/infer", json=digits_request())
    seq = int(reply.headers["x-telemetry-seq"].rpartition("-")[2])
    wait_until(
        lambda: httpx.get(server.url + "/api/telemetry/status").json()["durable_seq"] >= seq,
        timeout_s,
        "telemetry to reach the database",
        interval_s=0.02,
    )


def telemetry_rows(server: TransportServer, sql: str, *args: object) -> list[tuple]:
    """Rows of the server's real telemetry database."""
    with sqlite3.connect(server.state_dir / "telemetry.db") as db:
        return db.execute(sql, args).fetchall()


def settled_rows(server: TransportServer, sql: str, *args: object) -> list[tuple]:
    """The query's rows once two flushes in a row (`wait_durable`) leave them unchanged:
    what the server records of a client that left, once it has finished with it."""
    previous: list[tuple] | None = None
    for _ in range(50):
        wait_durable(server)
        rows = telemetry_rows(server, sql, *args)
        if rows == previous:
            return rows
        previous = rows
    raise AssertionError(f"telemetry rows kept changing: {previous}")
