"""Open-loop HTTP load: requests leave on a fixed schedule whatever the server does.

A closed-loop generator (wrk) sends the next request only when the previous one is
answered, so a slow server slows its own load down and a queue never builds. Here the
offered rate is fixed: `processes` worker processes each send their share of the rate
from a schedule (slot i at start + i / rate), over a pool of pre-opened keep-alive
connections, one request at a time per connection (HTTP/1.1, no pipelining).

Honesty rules:
- latency counts from the *scheduled* send time, so time a request spent waiting for a
  free connection or for the client's own loop is charged (no coordinated omission);
- a request not answered within `timeout_s` of its slot (sent or not) is counted as
  hung and its connection is closed;
- the achieved send rate and how late sends left (send lag) are reported next to the
  target, so a client that could not keep up is visible;
- the client's CPU use is reported: on a small box it shares the cores with the server.

Workers run as `python -m bench.openloop SPEC.json` and write their samples to an .npz;
`run_open_loop` starts them, releases them at one start time and merges the samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RATE_PER_PROCESS = 4000.0  # sends/s one worker keeps on its schedule while sharing 2 cores
TICK_S = 0.001  # the schedule is checked this often (uvloop timers have 1 ms steps)


@dataclass
class OpenLoopResult:
    target_rate: float  # requests/s asked for
    achieved_rate: float  # requests/s actually sent
    duration_s: float
    processes: int
    connections: int
    scheduled: int
    sent: int
    ok: int  # 200
    refused: int  # 429/503
    errors: int  # other statuses, connections closed under a request
    hung: int  # no answer within timeout_s of the slot (sent or never sent)
    timeout_s: float
    ok_per_s: float
    refused_per_s: float
    ok_p50_ms: float
    ok_p99_ms: float
    ok_max_ms: float
    refused_p50_ms: float
    refused_p99_ms: float
    send_lag_p99_ms: float  # how late requests left against their slot
    client_cpu_cores: float  # CPU seconds of the client processes / wall seconds
    # Accepted p99 counted from when the request was written, not from its slot: the
    # server's share of ok_p99_ms, without the client's own lateness.
    ok_from_send_p99_ms: float = float("nan")
    statuses: dict[str, int] = field(default_factory=dict)


# -- worker ---------------------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One keep-alive connection; parses just the status line and Content-Length."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # bytes of the whole response, once its head is read
        self.status = 0
        self.slot = 0.0  # scheduled time of the request in flight; 0 = idle
        self.sent_at = 0.0  # when it was written
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, slot: float, request: bytes, now: float) -> None:
        self.slot = slot
        self.sent_at = now
        self.need = -1
        self.buf.clear()
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            self.status = int(head[9:12])
            i = head.find(b"content-length:")
            length = 0
            if i >= 0:
                stop = head.find(b"\r\n", i)
                length = int(head[i + 15 : stop if stop >= 0 else len(head)])
            self.need = end + 4 + length
        if len(buf) >= self.need and self.slot:
            self.pool.answered(self, self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)


class _Pool:
    """Connections, the backlog of slots waiting for a connection, and the samples."""

    def __init__(self, host: str, port: int, requests: list[bytes], timeout_s: float) -> None:
        self.host, self.port = host, port
        self.requests = requests
        self.timeout_s = timeout_s
        self.idle: deque[_Conn] = deque()  # FIFO: every connection is used, none idles out
        self.busy: set[_Conn] = set()
        self.backlog: deque[float] = deque()  # slots with no free connection yet
        self.statuses: list[int] = []
        self.latencies: list[float] = []
        self.from_send: list[float] = []
        self.lags: list[float] = []
        self.sent = 0
        self.hung = 0
        self.lost_busy = 0
        self.size = 0
        self.n = 0

    async def open(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port)
            self.idle.append(conn)
        self.size = count

    def offer(self, slot: float) -> None:
        if self.idle:
            self._send(self.idle.popleft(), slot)
        else:
            self.backlog.append(slot)

    def _send(self, conn: _Conn, slot: float) -> None:
        now = time.perf_counter()
        self.lags.append(now - slot)
        self.sent += 1
        self.busy.add(conn)
        conn.send(slot, self.requests[self.n % len(self.requests)], now)
        self.n += 1

    def answered(self, conn: _Conn, status: int) -> None:
        now = time.perf_counter()
        self.statuses.append(status)
        self.latencies.append(now - conn.slot)
        self.from_send.append(now - conn.sent_at)
        conn.slot = 0.0
        self.busy.discard(conn)
        self._reuse(conn, now)

    def _reuse(self, conn: _Conn, now: float) -> None:
        while self.backlog:
            slot = self.backlog.popleft()
            if now - slot < self.timeout_s:
                self._send(conn, slot)
                return
            self.hung += 1  # waited for a connection past the timeout
        self.idle.append(conn)

    def lost(self, conn: _Conn) -> None:
        if conn in self.busy:
            self.busy.discard(conn)
            if conn.slot:
                self.lost_busy += 1  # closed under a request: an error, not a hang
                self.statuses.append(0)
                self.latencies.append(time.perf_counter() - conn.slot)
                self.from_send.append(time.perf_counter() - conn.sent_at)
        else:
            with contextlib.suppress(ValueError):
                self.idle.remove(conn)
        asyncio.get_running_loop().create_task(self._replace())

    async def _replace(self) -> None:
        try:
            _, conn = await asyncio.get_running_loop().create_connection(
                lambda: _Conn(self), self.host, self.port
            )
        except OSError:
            return
        self._reuse(conn, time.perf_counter())

    def expire(self, now: float) -> None:
        """Count slots older than the timeout as hung; their connections are given up."""
        while self.backlog and now - self.backlog[0] >= self.timeout_s:
            self.backlog.popleft()
            self.hung += 1
        for conn in [c for c in self.busy if c.slot and now - c.slot >= self.timeout_s]:
            self.hung += 1
            conn.slot = 0.0  # so losing it is not also an error
            self.busy.discard(conn)
            if conn.transport is not None:
                conn.transport.close()

    @property
    def pending(self) -> int:
        return len(self.backlog) + len(self.busy)


async def _drive(spec: dict) -> dict:
    extra = "".join(f"{k}: {v}\r\n" for k, v in spec["headers"].items())
    requests = [
        (
            f"POST {spec['path']} HTTP/1.1\r\nHost: {spec['host']}\r\n{extra}"
            f"Content-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in (text.encode("latin-1") for text in spec["bodies"])  # bytes, as sent
    ]
    rate, duration, timeout_s = spec["rate"], spec["duration_s"], spec["timeout_s"]
    pool = _Pool(spec["host"], int(spec["port"]), requests, timeout_s)
    await pool.open(spec["connections"])
    print("ready", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    start_wall = float(line)
    start = time.perf_counter() + (start_wall - time.time())
    total = int(rate * duration)
    interval = 1.0 / rate
    cpu0 = time.process_time()
    i = 0
    next_expiry = start
    while i < total:
        now = time.perf_counter()
        due = min(total, int((now - start) / interval) + 1) if now >= start else 0
        while i < due:
            pool.offer(start + i * interval)
            i += 1
        if now >= next_expiry:
            pool.expire(now)
            next_expiry = now + 0.1
        await asyncio.sleep(TICK_S)
    sending_s = time.perf_counter() - start
    while pool.pending:  # every slot gets its answer or its timeout
        pool.expire(time.perf_counter())
        await asyncio.sleep(0.01)
    cpu_s = time.process_time() - cpu0
    np.savez(
        spec["out"],
        statuses=np.array(pool.statuses, np.int16),
        latencies=np.array(pool.latencies, np.float64),
        from_send=np.array(pool.from_send, np.float64),
        lags=np.array(pool.lags, np.float64),
    )
    return {
        "scheduled": total,
        "sent": pool.sent,
        "hung": pool.hung,
        "sending_s": sending_s,
        "cpu_s": cpu_s,
        "connections": pool.size,
    }


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        import uvloop  # less CPU per request: more of the shared cores left to the server

        run = uvloop.run
    except ImportError:
        run = asyncio.run
    summary = run(_drive(spec))
    print(json.dumps(summary), flush=True)


# -- parent ---------------------------------------------------------------------------


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.quantile(values, q) * 1000) if len(values) else float("nan")


def run_open_loop(
    url: str,
    path: str,
    bodies: list[bytes],
    rate_per_s: float,
    duration_s: float,
    connections: int,
    timeout_s: float = 5.0,
    processes: int | None = None,
    headers: dict[str, str] | None = None,
) -> OpenLoopResult:
    """Offer `rate_per_s` for `duration_s` from worker processes; merge their samples.

    `headers` replace the default Content-Type (e.g. binary-extension bodies need
    Inference-Header-Content-Length)."""
    procs = processes or max(1, math.ceil(rate_per_s / RATE_PER_PROCESS))
    host, port = url.removeprefix("http://").rsplit(":", 1)
    work = Path(tempfile.mkdtemp(prefix="openloop-"))
    workers = []
    for k in range(procs):
        spec = {
            "host": host,
            "port": port,
            "path": path,
            "bodies": [b.decode("latin-1") for b in bodies],
            "headers": headers or {"Content-Type": "application/json"},
            "rate": rate_per_s / procs,
            "duration_s": duration_s,
            "timeout_s": timeout_s,
            "connections": max(1, connections // procs),
            "out": str(work / f"w{k}.npz"),
        }
        spec_path = work / f"w{k}.json"
        spec_path.write_text(json.dumps(spec))
        workers.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.openloop", str(spec_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        )
    try:
        for w in workers:
            assert w.stdout is not None
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError("open-loop worker failed to connect")
        start_wall = time.time() + 0.2
        for w in workers:
            assert w.stdin is not None
            w.stdin.write(f"{start_wall}\n")
            w.stdin.flush()
        summaries = []
        for w in workers:
            out, _ = w.communicate(timeout=duration_s + timeout_s + 120)
            summaries.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    samples = [np.load(work / f"w{k}.npz") for k in range(procs)]
    statuses = np.concatenate([s["statuses"] for s in samples])
    latencies = np.concatenate([s["latencies"] for s in samples])
    lags = np.concatenate([s["lags"] for s in samples])
    from_send = np.concatenate([s["from_send"] for s in samples])
    for f in work.iterdir():
        f.unlink()
    os.rmdir(work)
    return summarise(
        rate_per_s, duration_s, timeout_s, summaries, statuses, latencies, lags, from_send
    )


def summarise(
    rate: float,
    duration_s: float,
    timeout_s: float,
    summaries: list[dict],
    statuses: np.ndarray,
    latencies: np.ndarray,
    lags: np.ndarray,
    from_send: np.ndarray | None = None,
) -> OpenLoopResult:
    """One result from every worker's counters and samples (pure: tested without timing).

    `from_send` holds each answer's latency counted from when it was written, in the
    order of `statuses`."""
    sent = sum(s["sent"] for s in summaries)
    sending_s = max(s["sending_s"] for s in summaries) or duration_s
    ok = latencies[statuses == 200]
    refused = latencies[(statuses == 429) | (statuses == 503)]
    values, counts = np.unique(statuses, return_counts=True)
    return OpenLoopResult(
        target_rate=rate,
        achieved_rate=sent / sending_s,
        duration_s=sending_s,
        processes=len(summaries),
        connections=sum(s["connections"] for s in summaries),
        scheduled=sum(s["scheduled"] for s in summaries),
        sent=sent,
        ok=len(ok),
        refused=len(refused),
        errors=int(len(statuses) - len(ok) - len(refused)),
        hung=sum(s["hung"] for s in summaries),
        timeout_s=timeout_s,
        ok_per_s=len(ok) / sending_s,
        refused_per_s=len(refused) / sending_s,
        ok_p50_ms=_pct(ok, 0.50),
        ok_p99_ms=_pct(ok, 0.99),
        ok_max_ms=float(ok.max() * 1000) if len(ok) else float("nan"),
        refused_p50_ms=_pct(refused, 0.50),
        refused_p99_ms=_pct(refused, 0.99),
        send_lag_p99_ms=_pct(lags, 0.99),
        client_cpu_cores=sum(s["cpu_s"] for s in summaries) / sending_s,
        ok_from_send_p99_ms=(
            _pct(from_send[statuses == 200], 0.99) if from_send is not None else float("nan")
        ),
        statuses={str(int(v)): int(c) for v, c in zip(values, counts, strict=True)},
    )


if __name__ == "__main__":
    worker_main(sys.argv[1])
