"""Load generators: `wrk` for throughput (closed loop, N connections) and a small asyncio
raw-socket client for open-loop overload (a fixed offered rate, latency per status).

The asyncio client runs in its own process (`python -m bench.loadgen ...`) and prints one
JSON line; latencies are measured from the *scheduled* send time, so a server that falls
behind is charged for it (no coordinated omission).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@dataclass
class LoadResult:
    tool: str
    connections: int
    duration_s: float
    requests: int
    ok: int
    refused: int  # 429/503
    errors: int  # other statuses, socket errors, timeouts
    req_per_s: float
    p50_ms: float
    p99_ms: float
    ok_p50_ms: float = 0.0  # accepted requests only (open-loop client)
    ok_p99_ms: float = 0.0
    refused_p99_ms: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def wrk_lua(path: str, bodies: list[bytes], headers: dict[str, str]) -> str:
    """A wrk script that POSTs the bodies in turn."""
    lines = ['wrk.method = "POST"', f'wrk.path = "{path}"']
    for k, v in headers.items():
        lines.append(f'wrk.headers["{k}"] = "{v}"')
    lines.append("local bodies = {")
    for b in bodies:
        text = b.decode()
        assert "]==]" not in text
        lines.append(f"[==[{text}]==],")
    lines.append("}")
    lines.append("local i = 0")
    lines.append(
        "request = function() i = i % #bodies + 1 return wrk.format(nil, nil, nil, bodies[i]) end"
    )
    return "\n".join(lines) + "\n"


def run_wrk(
    base_url: str,
    path: str,
    bodies: list[bytes],
    connections: int,
    duration_s: float,
    headers: dict[str, str] | None = None,
    threads: int = 1,
) -> LoadResult:
    """Closed loop: `connections` keep-alive connections, each sending as fast as answered."""
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(wrk_lua(path, bodies, hdrs))
    cmd = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        script.name,
        base_url,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + 60).stdout
    Path(script.name).unlink(missing_ok=True)
    return parse_wrk(out, connections, duration_s)


def parse_wrk(text: str, connections: int, duration_s: float) -> LoadResult:
    def latency(pct: str) -> float:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")

    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    requests = int(m.group(1)) if m else 0
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = sum(int(g) for g in sock.groups()) if sock else 0
    refused = int(non2xx.group(1)) if non2xx else 0
    return LoadResult(
        tool="wrk",
        connections=connections,
        duration_s=duration_s,
        requests=requests,
        ok=requests - refused,
        refused=refused,  # wrk cannot tell 429 from other non-2xx; the server only refuses
        errors=socket_errors,
        req_per_s=float(rate.group(1)) if rate else 0.0,
        p50_ms=latency("50"),
        p99_ms=latency("99"),
    )


# -- open-loop asyncio client -------------------------------------------------------


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer


async def _one(conn: _Conn, request: bytes) -> int:
    conn.writer.write(request)
    head = await conn.reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await conn.reader.readexactly(length)
    return status


async def open_loop(
    host: str,
    port: int,
    path: str,
    bodies: list[bytes],
    rate_per_s: float,
    duration_s: float,
    max_connections: int,
    timeout_s: float = 10.0,
) -> LoadResult:
    """Send at `rate_per_s` on a schedule, using idle keep-alive connections (opening more
    up to `max_connections`); latency counts from the scheduled time."""
    requests = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]
    idle: list[_Conn] = []
    opened = 0
    samples: list[tuple[int, float]] = []
    errors = 0
    tasks: set[asyncio.Task] = set()

    async def fire(scheduled: float, request: bytes) -> None:
        nonlocal opened, errors
        conn = idle.pop() if idle else None
        if conn is None:
            opened += 1
        try:
            if conn is None:
                conn = _Conn(*await asyncio.open_connection(host, port))
            status = await asyncio.wait_for(_one(conn, request), timeout_s)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            opened -= 1
            if conn is not None:
                conn.writer.close()
            return
        samples.append((status, time.perf_counter() - scheduled))
        idle.append(conn)

    start = time.perf_counter()
    interval = 1.0 / rate_per_s
    n = 0
    while True:
        scheduled = start + n * interval
        if scheduled - start >= duration_s:
            break
        now = time.perf_counter()
        if scheduled > now:
            await asyncio.sleep(scheduled - now)
        if not idle and opened >= max_connections:
            errors += 1  # the client has no connection left: counted, not queued
        else:
            task = asyncio.ensure_future(fire(scheduled, requests[n % len(requests)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s + 1)
    elapsed = time.perf_counter() - start
    for conn in idle:
        conn.writer.close()
    return _summarise(samples, errors, max_connections, elapsed)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000


def _summarise(
    samples: list[tuple[int, float]], errors: int, connections: int, elapsed: float
) -> LoadResult:
    ok = [t for s, t in samples if s == 200]
    refused = [t for s, t in samples if s in (429, 503)]
    statuses: dict[str, int] = {}
    for s, _ in samples:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    other = len(samples) - len(ok) - len(refused)
    return LoadResult(
        tool="asyncio-open-loop",
        connections=connections,
        duration_s=elapsed,
        requests=len(samples) + errors,
        ok=len(ok),
        refused=len(refused),
        errors=errors + other,
        req_per_s=len(samples) / elapsed,
        p50_ms=_pct([t for _, t in samples], 0.50),
        p99_ms=_pct([t for _, t in samples], 0.99),
        ok_p50_ms=_pct(ok, 0.50),
        ok_p99_ms=_pct(ok, 0.99),
        refused_p99_ms=_pct(refused, 0.99),
        statuses=statuses,
    )


def run_open_loop(
    url: str,
    path: str,
    bodies: list[bytes],
    rate_per_s: float,
    duration_s: float,
    max_connections: int,
) -> LoadResult:
    """Run the open-loop client in a separate process (so it does not share our GIL)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".jsonl", delete=False) as f:
        for b in bodies:
            f.write(b + b"\n")
    host, port = url.removeprefix("http://").rsplit(":", 1)
    cmd = [
        sys.executable,
        "-m",
        "bench.loadgen",
        host,
        port,
        path,
        f.name,
        str(rate_per_s),
        str(duration_s),
        str(max_connections),
    ]
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration_s + 120, cwd=root
    ).stdout
    Path(f.name).unlink(missing_ok=True)
    return LoadResult(**json.loads(out.strip().splitlines()[-1]))


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="open-loop HTTP load (bench internal)")
    for name in ("host", "port", "path", "bodies", "rate", "duration", "connections"):
        p.add_argument(name)
    a = p.parse_args(argv)
    bodies = [line for line in Path(a.bodies).read_bytes().splitlines() if line]
    result = asyncio.run(
        open_loop(
            a.host,
            int(a.port),
            a.path,
            bodies,
            float(a.rate),
            float(a.duration),
            int(a.connections),
        )
    )
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main(sys.argv[1:])
