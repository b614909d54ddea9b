"""Python bytecodes the event loop runs per inference: a figure a shared box cannot move.

    python -m bench.loopops                  # digits, shipped configuration, 16 connections
    python -m bench.loopops --top 40         # + the functions that run the most of them
    python -m bench.loopops --tree /tmp/base      # another checkout's edgeserve (in-process)
    python -m bench.loopops --model-dir /tmp/edgeserve-models/minilm   # a model built elsewhere
    python -m bench.loopops --variant auth-off    # a share: shipped minus this variant

On a box shared with other sessions the loop's CPU per request (bench/loopcpu.py) moves
by 20 % or more between rounds, more than most single changes to the request path. Here
the real app (`build_app`, its lifespan, the registry and batcher, auth on with a real
token, telemetry on) is served by the real uvicorn protocol, edgeserve's subclasses
included, over in-memory transports: `--connections` of them each send one inference at
a time. The main thread's bytecodes are counted with `sys.settrace` opcode events, which
counts Python work (C calls such as orjson, numpy and the socket are not in it, and none
of it is time), with the loop-lag gate stopped so that the slow traced loop sheds nothing;
what varies from run to run is how requests fall into batches (and the few the batcher
still refuses, which are counted). It also prints the main thread's CPU per request
without the tracer, as noisy as ever, and the other threads' (the telemetry writer's, the
rest: runtime and batcher) over those same untraced requests. `--variant` serves a
departure as `edgeserve bench` does (bench/servers.py: `auth-off` sends no token), so
that the cost of auth or of telemetry is a difference of two repeatable figures.
`--packages` adds each edgeserve package's bytecodes. A benchmark, not a test: it
asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

from bench import servers

PATH = "/v2/models/{model}/infer"
VARIANTS = {
    "shipped": servers.SHIPPED,
    "auth-off": servers.AUTH_OFF,
    "telemetry-off": servers.TELEMETRY_OFF,
}
WRITER_THREAD = "telemetry-writer"  # edgeserve.telemetry.store's Python thread name


class _Transport(asyncio.Transport):
    """Collects writes; each write is one whole answer (edgeserve writes once)."""

    def __init__(self, answered: Any) -> None:
        super().__init__()
        self.answered = answered
        self.last = b""
        self.refused = 0
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.last = bytes(data)
        if not self.last.startswith(b"HTTP/1.1 200 "):
            self.refused += 1
        self.answered()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )


class _Opcodes:
    """A `sys.settrace` tracer counting opcode events, in all and per function."""

    def __init__(self) -> None:
        self.total = 0
        self.by_code: Counter = Counter()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        if event == "opcode":
            self.total += 1
            self.by_code[frame.f_code] += 1
        return self


async def _measure(args: argparse.Namespace) -> None:
    import uvicorn
    from uvicorn.server import ServerState

    from bench import workload  # imports edgeserve: after --tree took effect
    from edgeserve.auth.issuer import create_token, init_keys
    from edgeserve.config.loader import load_settings
    from edgeserve.server import _guarded_httptools, build_served_app

    folder = args.model_dir or servers.ROOT / "models" / args.model
    specs = workload.signature(folder, args.version, "onnxruntime")
    body = workload.bodies(specs, workload.sample_rows(folder, specs))[0]
    tmp = Path(tempfile.mkdtemp(prefix="loopops-"))
    repo = servers.write_repository(tmp / "repo", folder, args.version, "onnxruntime")
    state = tmp / "state"
    init_keys(state)
    config_path = tmp / "edgeserve.toml"
    variant = VARIANTS[args.variant]
    config_path.write_text(servers.edgeserve_config(0, "uvicorn", state, repo, variant=variant))
    authorization = ""
    if variant.auth:
        token = create_token(state, ["infer"], 3600, "bench", "edgeserve-local", "edgeserve")
        authorization = f"Authorization: Bearer {token}\r\n"
    request = (
        f"POST {PATH.format(model=folder.name)} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        f"Content-Type: application/json\r\n{authorization}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    settings = load_settings(config_path)
    app, served, bounds = build_served_app(settings)
    config = uvicorn.Config(
        served,
        http=_guarded_httptools(settings, bounds),  # type: ignore[arg-type]
        lifespan="off",
        proxy_headers=False,
        access_log=False,
        log_config=None,
        server_header=False,
    )
    config.load()
    server_state = ServerState()
    loop = asyncio.get_running_loop()
    async with app.router.lifespan_context(app):
        await app.state.loading
        waiting = [0]
        all_answered = asyncio.Event()

        def answered() -> None:
            waiting[0] -= 1
            if not waiting[0]:
                all_answered.set()

        connections = []
        for _ in range(args.connections):
            protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=server_state, app_state={}, _loop=loop
            )
            transport = _Transport(answered)
            protocol.connection_made(transport)
            connections.append((protocol, transport))

        async def rounds(n: int) -> None:
            for _ in range(n):
                all_answered.clear()
                waiting[0] = len(connections)
                for protocol, _ in connections:
                    protocol.data_received(request)
                await all_answered.wait()

        await rounds(args.warmup)
        if all(transport.refused == args.warmup for _, transport in connections):
            raise SystemExit(f"no 200 in the warm-up: {connections[0][1].last[:300]!r}")
        n = args.requests // len(connections)
        requests = n * len(connections)
        gc.collect()
        writer = _writer_clock()
        cpu, writer_cpu, process_cpu = time.thread_time(), _clock(writer), time.process_time()
        await rounds(n)
        cpu_us = 1e6 * (time.thread_time() - cpu) / requests
        store = getattr(app.state.recorder, "store", None)
        if store is not None:
            store.flush(60)  # the writer's work for these requests, committed
        writer_us = 1e6 * (_clock(writer) - writer_cpu) / requests
        others_us = 1e6 * (time.process_time() - process_cpu) / requests - cpu_us - writer_us
        # Traced, the loop runs ~20x slower: its lag monitor would shed requests and
        # change the path measured. Stopped, every request takes the accepted path.
        gate = app.state.loop_gate
        if gate is not None:
            gate.stop()
        refused = sum(transport.refused for _, transport in connections)
        tracer = _Opcodes()
        sys.settrace(tracer)
        await rounds(n)
        sys.settrace(None)
        refused = sum(transport.refused for _, transport in connections) - refused
        if refused:
            print(f"{refused} of the traced requests were not answered 200")
        for protocol, transport in connections:
            transport.close()
            protocol.connection_lost(None)
    import edgeserve

    print(
        f"edgeserve from {Path(edgeserve.__file__).parent.parent}: "
        f"{folder.name} v{args.version}, {args.connections} connections, {requests} requests: "
        f"{tracer.total / requests:.0f} bytecodes/req on the loop thread "
        f"({args.variant}; untraced CPU µs/req: main thread {cpu_us:.1f}, "
        f"telemetry writer {writer_us:.1f}, other threads {others_us:.1f})"
    )
    if args.packages:
        for package, count in _by_package(tracer.by_code).most_common():
            print(f"{count / requests:8.1f}  {package}")
    for code, count in tracer.by_code.most_common(args.top):
        where = f"{Path(code.co_filename).name}:{code.co_firstlineno}"
        print(f"{count / requests:8.1f}  {code.co_qualname}  ({where})")


def _writer_clock() -> int | None:
    """The CPU clock of the telemetry writer thread (None with telemetry off)."""
    for thread in threading.enumerate():
        if thread.name == WRITER_THREAD and thread.ident is not None:
            return time.pthread_getcpuclockid(thread.ident)
    return None


def _clock(clock: int | None) -> float:
    return 0.0 if clock is None else time.clock_gettime(clock)


def _by_package(by_code: Counter) -> Counter:
    """Bytecodes by edgeserve package (`edgeserve/auth`, ...); others by library."""
    out: Counter = Counter()
    for code, count in by_code.items():
        parts = Path(code.co_filename).parts
        if "edgeserve" in parts:
            at = len(parts) - 1 - parts[::-1].index("edgeserve")
            out[os.path.join(*parts[at : min(at + 2, len(parts) - 1)])] += count
        elif "site-packages" in parts:
            out[parts[parts.index("site-packages") + 1]] += count
        else:
            out[Path(code.co_filename).name] += count
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits", help="a folder of models/")
    parser.add_argument(
        "--model-dir",
        type=Path,
        help="a model folder built elsewhere, e.g. /tmp/edgeserve-models/minilm (over --model)",
    )
    parser.add_argument("--version", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1600)
    parser.add_argument("--warmup", type=int, default=100, help="rounds before measuring")
    parser.add_argument("--top", type=int, default=0, help="print the N busiest functions")
    parser.add_argument("--tree", type=Path, help="import edgeserve from this checkout")
    parser.add_argument(
        "--variant",
        choices=tuple(VARIANTS),
        default="shipped",
        help="the configuration served (auth-off: no token sent, as edgeserve bench does)",
    )
    parser.add_argument(
        "--packages", action="store_true", help="print bytecodes by edgeserve package"
    )
    args = parser.parse_args(argv)
    if args.tree is not None:
        sys.path.insert(0, str(args.tree.resolve()))
    import uvloop

    uvloop.run(_measure(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
