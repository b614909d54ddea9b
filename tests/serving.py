"""Start real edgeserve server processes on loopback for tests."""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"


# The port the server reports it bound: `[server] port = 0` lets the kernel pick one,
# so no other process can take it between choosing and binding (free_port's race).
LISTENING = re.compile(rb"listening url=\w+://[^ ]*?:(\d+)")
# Likewise `[server] grpc_port = "auto"`: the gRPC port the server bound is in this line.
GRPC_LISTENING = re.compile(rb"grpc listening address=(\S+):(\d+) ")
_servers = itertools.count(1)  # names each server's config and log in a shared tmp_path


def free_port() -> int:
    """A port free now, only for a port that must be known before its server starts (a
    README block naming it, a program told it on its command line, a collector the box
    sends to while it is down); it may be taken before it is used. Anything that can
    bind port 0 (HTTP `port = 0`, `grpc_port = "auto"`, test collectors) does that."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    port: int
    process: subprocess.Popen
    config_path: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def grpc_address(self, timeout_s: float = 60.0) -> str:
        """`HOST:PORT` from the server's `grpc listening` line: with `grpc_port = "auto"`
        the kernel picks the port, so no other process can take it first."""

        def address() -> str | None:
            found = GRPC_LISTENING.search(self.log_path.read_bytes())
            if found:
                return f"{found.group(1).decode()}:{int(found.group(2))}"
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited before serving gRPC:\n{self.log()}")
            return None

        return wait_until(address, timeout_s, lambda: f"gRPC listening:\n{self.log()}")


def write_config(
    path: Path, text: str, port: int, state_dir: Path, repository: Path = MODELS
) -> Path:
    """A config with server/models sections filled in; `text` adds more sections/keys.

    `text` may contain a `[server]` or `[models]` table of its own only if it does not
    repeat the keys written here.
    """
    base = (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "{state_dir}"\n'
        f'[models]\nrepository = "{repository}"\n'
        # Only the committed demo models: a locally built MiniLM must not slow every test.
        + ('load = ["digits"]\n' if repository == MODELS else "")
    )
    path.write_text(base + "\n" + text)
    return path


@contextmanager
def run_server(
    tmp_path: Path,
    extra_config: str = "",
    *,
    repository: Path = MODELS,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 60.0,
    wait_ready: bool = True,
    config_text: str | None = None,
) -> Iterator[RunningServer]:
    """Run `edgeserve serve` in a subprocess until the block ends (SIGTERM, then SIGKILL).

    The server binds port 0 and the port comes from its `listening` line, unless
    `config_text` uses `{port}` beyond `port = {port}` (a public URL, say): then a port
    is chosen here first."""
    own_choice = config_text is None or (
        config_text.count("{port}") == 1 and "port = {port}" in config_text
    )
    port = 0 if own_choice else free_port()  # a public_url naming the port: known first
    n = next(_servers)
    state_dir = tmp_path / "state"
    config = tmp_path / f"edgeserve-{n}.toml"
    if config_text is not None:
        config.write_text(config_text.replace("{port}", str(port)))
    else:
        write_config(config, extra_config, port, state_dir, repository)
    log_path = tmp_path / f"server-{n}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "edgeserve", "serve", "--config", str(config)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )
    try:
        if not port:
            port = _reported_port(process, log_path, ready_timeout_s)
        server = RunningServer(f"http://127.0.0.1:{port}", port, process, config, log_path)
        if wait_ready:
            wait_until_ready(server, ready_timeout_s)
        yield server
    finally:
        stop(process)
        log_file.close()


def _reported_port(process: subprocess.Popen, log_path: Path, timeout_s: float) -> int:
    """The port in the server's `listening` line; 0 when it exited before listening (a
    start-up failure the caller looks at)."""

    def port() -> int | None:  # -1: exited before listening
        found = LISTENING.search(log_path.read_bytes())
        if found:
            return int(found.group(1))
        return -1 if process.poll() is not None else None

    def what() -> str:
        return f"the server listening:\n{log_path.read_text()}"

    return max(0, wait_until(port, timeout_s, what, interval_s=0.02))


def wait_until_ready(server: RunningServer, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/v2/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"server not ready after {timeout_s}s:\n{server.log()}")


def stop(process: subprocess.Popen, timeout_s: float = 15.0) -> int | None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
