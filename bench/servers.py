"""Start the servers under test on loopback: edgeserve (either engine) and the peer
(Seldon MLServer in its own venv), wait until ready, sample their memory.

The peer's venv is never the project's:
    python3 -m venv /tmp/mlserver-venv
    /tmp/mlserver-venv/bin/pip install mlserver onnxruntime numpy "uvloop<0.22"
(MLServer 1.7.1's inference workers fail to start with uvloop 0.23: no current event loop.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
MLSERVER_VENV = Path(os.environ.get("EDGESERVE_BENCH_MLSERVER_VENV", "/tmp/mlserver-venv"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str
    process: subprocess.Popen
    ready_s: float
    log_path: Path
    rss_samples: list[int] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)  # sent with every request

    def rss_bytes(self) -> int:
        """Resident memory of the server and its children (MLServer forks workers)."""
        try:
            proc = psutil.Process(self.process.pid)
            procs = [proc, *proc.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs if p.is_running())
        except psutil.Error:
            return 0

    @contextmanager
    def sampling_rss(self, every_s: float = 0.2) -> Iterator[list[int]]:
        """Collect RSS samples in a thread while the block runs."""
        samples: list[int] = []
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                samples.append(self.rss_bytes())

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            yield samples
        finally:
            stop.set()
            t.join()


def write_repository(
    dest: Path, model_dir: Path, version: int, backend: str, extra: str = ""
) -> Path:
    """A one-model repository: the model's files linked in, model.toml with the backend
    forced (and `extra` tables appended, e.g. a [batching] override)."""
    target = dest / model_dir.name
    target.mkdir(parents=True)
    lines = [
        line
        for line in (model_dir / "model.toml").read_text().splitlines()
        if not line.strip().startswith("backend")
    ]
    text = f'backend = "{backend}"\n' + "\n".join(lines) + "\n"
    if extra:
        text = _merge_tables(text, extra)
    (target / "model.toml").write_text(text)
    (target / str(version)).symlink_to((model_dir / str(version)).resolve())
    return dest


def _merge_tables(text: str, extra: str) -> str:
    """Append `extra` ([table] key = value lines), replacing keys of tables already there."""
    current = None
    overrides: dict[str, dict[str, str]] = {}
    for line in extra.strip().splitlines():
        if line.startswith("["):
            current = line.strip()
            overrides.setdefault(current, {})
        elif "=" in line and current:
            key, value = (p.strip() for p in line.split("=", 1))
            overrides[current][key] = value
    out: list[str] = []
    table = None
    for line in text.splitlines():
        if line.startswith("["):
            if table in overrides:
                out.extend(f"{k} = {v}" for k, v in overrides.pop(table).items())
            table = line.strip()
        elif table in overrides and "=" in line:
            key = line.split("=", 1)[0].strip()
            if key in overrides[table]:
                continue
        out.append(line)
    if table in overrides:
        out.extend(f"{k} = {v}" for k, v in overrides.pop(table).items())
    for name, values in overrides.items():
        out.append(name)
        out.extend(f"{k} = {v}" for k, v in values.items())
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Variant:
    """The shipped configuration (auth on, telemetry on: edgeserve.toml's defaults) or one
    named departure from it, measured beside it in the same run."""

    name: str
    auth: bool = True
    telemetry: bool = True


SHIPPED = Variant("shipped")
AUTH_OFF = Variant("auth off", auth=False)
TELEMETRY_OFF = Variant("telemetry off", telemetry=False)
# A token's lifetime: longer than any one server's part of a run.
TOKEN_TTL = "1d"


def edgeserve_config(
    port: int,
    engine: str,
    state_dir: Path,
    repository: Path,
    variant: Variant = SHIPPED,
    extra: str = "",
    server_keys: str = "",
) -> str:
    """The server's TOML: only what the bench must set (address, engine, state, models)
    and what `variant` departs from; every other key keeps its shipped default."""
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nengine = "{engine}"\n'
        f'state_dir = "{state_dir}"\n{server_keys}'
        f'[models]\nrepository = "{repository}"\n'
    )
    if not variant.auth:
        config += "[auth]\nenabled = false\n"
    if not variant.telemetry:
        config += "[telemetry]\nenabled = false\n"
    return config + extra


@contextmanager
def edgeserve(
    work: Path,
    repository: Path,
    engine: str,
    extra: str = "",
    server_keys: str = "",
    variant: Variant = SHIPPED,
) -> Iterator[Running]:
    """`edgeserve serve` on a free loopback port until the block ends, configured as
    shipped unless `variant` says otherwise; `extra` tables go at the end of the config,
    `server_keys` lines into its [server] table. With auth on, `headers` carries a bearer
    token minted by `edgeserve token create` with the server's own local key."""
    port = free_port()
    config = edgeserve_config(port, engine, work / "state", repository, variant, extra, server_keys)
    command = ["edgeserve", "serve", "--config"]
    with _configured(work, "edgeserve", port, config, command, cwd=work) as srv:
        if variant.auth:
            token = mint_token(work / f"edgeserve-{port}.toml")
            srv.headers["Authorization"] = f"Bearer {token}"
        yield srv


def mint_token(config_path: Path, scopes: Sequence[str] = ("infer",)) -> str:
    """A token from the server's local issuer, as a user mints one (README, First calls):
    `edgeserve token create` against the same config, so the same state dir and key."""
    cmd = [sys.executable, "-m", "edgeserve", "token", "create", "--config", str(config_path)]
    cmd += [arg for scope in scopes for arg in ("--scope", scope)]
    cmd += ["--ttl", TOKEN_TTL, "--subject", "bench"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=config_path.parent, timeout=60)
    if out.returncode:
        raise RuntimeError(f"edgeserve token create failed: {out.stderr.strip()[-500:]}")
    return out.stdout.strip().splitlines()[-1]


@contextmanager
def floor(work: Path, repository: Path, model: str) -> Iterator[Running]:
    """bench/floor.py on a free loopback port: the same models, batcher and thread plan as
    `edgeserve serve`, behind the least Python HTTP path (telemetry and auth off)."""
    port = free_port()
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nstate_dir = "{work / "state"}"\n'
        f'log_level = "warning"\n[models]\nrepository = "{repository}"\n'
        "[auth]\nenabled = false\n[telemetry]\nenabled = false\n"
    )
    with _configured(work, "floor", port, config, ["bench.floor"], [str(port), model]) as srv:
        yield srv


@contextmanager
def _configured(
    work: Path,
    stem: str,
    port: int,
    config: str,
    module: list[str],
    args: Sequence[str] = (),
    cwd: Path = ROOT,
) -> Iterator[Running]:
    """Write `config` to a file, run `python -m <module> <file> <args>` in `cwd`, and wait
    until it answers /v2/health/ready on `port`."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{stem}-{port}.toml"
    path.write_text(config)
    log_path = work / f"{stem}-{port}.log"
    cmd = [sys.executable, "-m", *module, str(path), *args]
    with _process(cmd, log_path, cwd) as (process, started):
        url = f"http://127.0.0.1:{port}"
        ready = _wait_ready(url + "/v2/health/ready", process, started, log_path)
        yield Running(url, process, ready, log_path)


def mlserver_available() -> bool:
    return (MLSERVER_VENV / "bin" / "mlserver").exists()


@contextmanager
def mlserver(work: Path, model_dir: Path, version: int, name: str, intra: int) -> Iterator[Running]:
    """Seldon MLServer serving the same model.onnx through bench/mlserver_runtime.py."""
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    repo = work / "mlserver-models"
    folder = repo / name
    folder.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("mlserver_runtime.py"), folder / "mlserver_runtime.py")
    (folder / "model-settings.json").write_text(
        json.dumps(
            {
                "name": name,
                "implementation": "mlserver_runtime.OnnxModel",
                "parameters": {
                    "uri": str((model_dir / str(version) / "model.onnx").resolve()),
                    "extra": {"intra_op_threads": intra},
                },
            }
        )
    )
    (repo / "settings.json").write_text(
        json.dumps(
            {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": grpc_port,
                "metrics_port": metrics_port,
            }
        )
    )
    log_path = work / "mlserver.log"
    cmd = [str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(repo)]
    with _process(cmd, log_path, repo) as (process, started):
        url = f"http://127.0.0.1:{http_port}"
        ready = _wait_ready(url + f"/v2/models/{name}/ready", process, started, log_path, 180)
        yield Running(url, process, ready, log_path)


@contextmanager
def _process(cmd: list[str], log_path: Path, cwd: Path) -> Iterator[tuple[subprocess.Popen, float]]:
    log = log_path.open("wb")
    started = time.perf_counter()
    process = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True
    )
    try:
        yield process, started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _wait_ready(
    url: str, process: subprocess.Popen, started: float, log_path: Path, timeout_s: float = 120
) -> float:
    """Seconds from process start until `url` answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited early:\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.01)
    raise TimeoutError(
        f"not ready after {timeout_s}s:\n{log_path.read_text(errors='replace')[-3000:]}"
    )
