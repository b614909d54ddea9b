"""Closed-loop load with `wrk`: N keep-alive connections, each sending as fast as it is
answered (throughput and latency at a concurrency). Open-loop load, for overload, is
bench/openloop.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
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


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def _lua_string(body: bytes) -> str:
    """`body` as a Lua string literal, byte for byte: a JSON body as it is, a binary-tensor
    body's raw bytes as decimal escapes."""
    plain = set(range(0x20, 0x7F)) - {ord('"'), ord("\\")}
    return '"' + "".join(chr(c) if c in plain else f"\\{c:03d}" for c in body) + '"'


def wrk_lua(path: str, bodies: list[bytes], headers: dict[str, str]) -> str:
    """A wrk script that POSTs the bodies in turn."""
    lines = ['wrk.method = "POST"', f'wrk.path = "{path}"']
    for k, v in headers.items():
        lines.append(f'wrk.headers["{k}"] = "{v}"')
    lines.append("local bodies = {")
    lines.extend(f"{_lua_string(b)}," for b in bodies)
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
