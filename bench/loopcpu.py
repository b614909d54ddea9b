"""Event-loop CPU per request, the shipped configuration beside auth off, telemetry off
and the Python floor, all in one run.

    python -m bench.loopcpu                      # digits, 16 connections, 5 rounds of 4 s
    python -m bench.loopcpu --rounds 3 --duration 3 --variants shipped floor
    python -m bench.loopcpu --baseline /tmp/base   # + "shipped (baseline)": that tree's code
    python -m bench.loopcpu --model-dir /tmp/edgeserve-models/minilm --connections 32

Every server is started first and stays up; then each round runs wrk against each server
in turn (the order rotates), reading the event loop thread's CPU from `/proc` just before
and after (bench/threadcpu.py). `--baseline DIR` adds the shipped configuration run from
another checkout's `edgeserve` (e.g. `git archive BASE edgeserve | tar -x -C DIR`), so a
change is measured before and after in the same run. Interleaving the servers round by
round is what makes the figures comparable on a box whose speed drifts, or that others
share: the loop's CPU per request moves much less with load than req/s does, but it
still moves. Prints the median and range over the rounds per server, and the telemetry
writer thread's CPU per request (by its kernel name; "–" where telemetry is off or the
code predates the name). A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import loadgen, servers, threadcpu, workload
from bench.run import check_answers
from edgeserve.telemetry.store import WRITER_THREAD_NAME

VARIANTS = {
    "shipped": servers.SHIPPED,
    "auth off": servers.AUTH_OFF,
    "telemetry off": servers.TELEMETRY_OFF,
}
FLOOR = "floor"
BASELINE = "shipped (baseline)"
ENGINE = "uvicorn"  # edgeserve.toml's default


@contextmanager
def _pythonpath(tree: str) -> Iterator[None]:
    """Processes started in the block import `edgeserve` from `tree`."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = tree
    try:
        yield
    finally:
        os.environ.pop("PYTHONPATH")
        if saved is not None:
            os.environ["PYTHONPATH"] = saved


@contextmanager
def _server(name: str, work: Path, folder: Path, version: int, model: str) -> Iterator:
    if name.startswith(BASELINE):
        with ExitStack() as stack:
            with _pythonpath(name[len(BASELINE) + 1 :]):  # the server and its token command
                srv = stack.enter_context(_server("shipped", work, folder, version, model))
            yield srv
        return
    repo = servers.write_repository(
        Path(tempfile.mkdtemp(dir=work)), folder, version, "onnxruntime"
    )
    if name == FLOOR:
        with servers.floor(Path(tempfile.mkdtemp(dir=work)), repo, model) as srv:
            yield srv
        return
    with servers.edgeserve(
        Path(tempfile.mkdtemp(dir=work, prefix="es-")), repo, ENGINE, variant=VARIANTS[name]
    ) as srv:
        yield srv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits", help="a folder of models/")
    parser.add_argument("--model-dir", type=Path, help="a model folder elsewhere (MiniLM)")
    parser.add_argument("--version", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--variants", nargs="+", default=[*VARIANTS, FLOOR], choices=[*VARIANTS, FLOOR]
    )
    parser.add_argument("--baseline", type=Path, help="also run shipped from this checkout")
    args = parser.parse_args(argv)
    if args.baseline is not None:
        args.variants.insert(1, f"{BASELINE} {args.baseline.resolve()}")
    folder = args.model_dir or servers.ROOT / "models" / args.model
    args.model = folder.name
    specs = workload.signature(folder, args.version, "onnxruntime")
    bodies = workload.bodies(specs, workload.sample_rows(folder, specs))
    path = f"/v2/models/{args.model}/infer"
    labels = [name.split(" /")[0] for name in args.variants]
    loop_us: dict[str, list[float]] = {name: [] for name in labels}
    process_us: dict[str, list[float]] = {name: [] for name in labels}
    writer_us: dict[str, list[float]] = {name: [] for name in labels}
    rates: dict[str, list[float]] = {name: [] for name in labels}
    with tempfile.TemporaryDirectory(prefix="loopcpu-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        running = {
            name.split(" /")[0]: stack.enter_context(
                _server(name, work, folder, args.version, args.model)
            )
            for name in args.variants
        }
        for srv in running.values():
            check_answers(srv.url, path, bodies[0], srv.headers)
            loadgen.run_wrk(srv.url, path, bodies, args.connections, 2, srv.headers)  # warm-up
        names = list(running)
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                srv = running[name]
                pid = srv.process.pid
                before = threadcpu.sample(pid)
                r = loadgen.run_wrk(
                    srv.url, path, bodies, args.connections, args.duration, srv.headers
                )
                after = threadcpu.sample(pid)
                cpu = threadcpu.per_request_us(pid, before, after, r.requests)
                writer = threadcpu.named_us_per_request(
                    before, after, r.requests, WRITER_THREAD_NAME
                )
                if r.refused or r.errors:
                    print(f"   {name}: {r.refused} refused, {r.errors} errors", flush=True)
                if cpu["loop_us_per_request"] is None:
                    continue
                loop_us[name].append(cpu["loop_us_per_request"])
                process_us[name].append(cpu["process_us_per_request"] or 0.0)
                if writer is not None:
                    writer_us[name].append(writer)
                rates[name].append(r.req_per_s)
            print(
                f"round {round_ + 1}: "
                + "  ".join(f"{n} {loop_us[n][-1]:.0f}" for n in names if loop_us[n]),
                flush=True,
            )
    print(
        f"\n{args.model} v{args.version}, JSON, {args.connections} connections, "
        f"{args.rounds} rounds of {args.duration:g} s; median (min-max) over rounds"
    )
    print(
        f"{'server':20s} {'loop µs/req':>22s} {'process µs/req':>16s} "
        f"{'writer µs/req':>14s} {'req/s':>9s}"
    )
    for name in names:
        if not loop_us[name]:
            continue
        lo, hi = min(loop_us[name]), max(loop_us[name])
        med = statistics.median(loop_us[name])
        writer = f"{statistics.median(writer_us[name]):.1f}" if writer_us[name] else "–"
        print(
            f"{name:20s} {med:8.1f} ({lo:5.1f}-{hi:5.1f})    "
            f"{statistics.median(process_us[name]):12.1f} {writer:>14s} "
            f"{statistics.median(rates[name]):9.0f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
