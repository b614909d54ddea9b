"""A compute-bound model's rows/s against the raw runtime, interleaved round by round.

    python -m bench.heavyratio --model-dir /tmp/edgeserve-models/minilm
    python -m bench.heavyratio --model-dir DIR --rounds 10 --duration 4 --batch 16

On this box ONNX Runtime's speed switches between two levels for tens of seconds at a
time (the same 8-row MiniLM batch took ~22.5 or ~29.3 ms, bench/RESULTS.md), so a
server's 10 s point and the raw reference's short runs around it can fall on different
levels: `edgeserve bench` read the same code at 0.74-0.87× of raw. Here the shipped
server (and the Python floor, for the same ratio of any Python front end) and the raw
reference point (`bench.raw` in point mode, its own process, the server idle meanwhile)
run in turn for `--duration` seconds each, round after round, the order rotating; each
round gives a ratio from neighbouring segments, and the median of those ratios is the
figure. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from bench import loadgen, servers, workload
from bench.headline import answered_per_s
from bench.run import check_answers, raw_point, raw_spec

RAW = "raw"
SHIPPED = "shipped"
FLOOR = "floor"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="e.g. MiniLM's folder")
    parser.add_argument("--version", type=int, default=2)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per segment")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--plan", default="2x1", help="the raw point: executors x intra-op")
    parser.add_argument("--batch", type=int, default=8, help="the raw point's batch size")
    args = parser.parse_args(argv)
    folder, model = args.model_dir, args.model_dir.name
    specs = workload.signature(folder, args.version, args.backend)
    rows = workload.sample_rows(folder, specs)
    bodies = workload.bodies(specs, rows)
    path = f"/v2/models/{model}/infer"
    rates: dict[str, list[float]] = {SHIPPED: [], FLOOR: [], RAW: []}
    ratios: dict[str, list[float]] = {SHIPPED: [], FLOOR: []}
    with tempfile.TemporaryDirectory(prefix="heavyratio-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        spec = raw_spec(
            folder, args.version, args.backend, rows, work / "inputs.npz", args.duration
        )
        spec["point"] = {"plan": args.plan, "batch": args.batch}
        point_path = work / "raw-point.json"
        point_path.write_text(json.dumps(spec))
        repo = servers.write_repository(work / "repo", folder, args.version, args.backend)
        running = {
            SHIPPED: stack.enter_context(servers.edgeserve(work / "es", repo, "uvicorn")),
            FLOOR: stack.enter_context(servers.floor(work / "floor", repo, model)),
        }
        for srv in running.values():
            check_answers(srv.url, path, bodies[0], srv.headers)
            loadgen.run_wrk(srv.url, path, bodies, args.connections, 3, srv.headers)  # warm-up
        names = [SHIPPED, RAW, FLOOR]
        for round_ in range(args.rounds):
            measured: dict[str, float] = {}
            for name in names[round_ % 3 :] + names[: round_ % 3]:
                if name == RAW:
                    value = raw_point(point_path)
                    if value is None:
                        continue
                else:
                    srv = running[name]
                    r = loadgen.run_wrk(
                        srv.url, path, bodies, args.connections, args.duration, srv.headers
                    )
                    value = answered_per_s(asdict(r)) or 0.0  # refusals are not rows
                measured[name] = value
                rates[name].append(value)
            if RAW in measured:
                for name in ratios:
                    ratios[name].append(measured[name] / measured[RAW])
            print(
                f"round {round_ + 1}: "
                + "  ".join(f"{n} {v:.0f}" for n, v in measured.items())
                + (f"  shipped ÷ raw {ratios[SHIPPED][-1]:.3f}" if RAW in measured else ""),
                flush=True,
            )
    print(
        f"\n{model} v{args.version}, JSON, {args.connections} connections, raw point "
        f"{args.plan} batch {args.batch}; {args.rounds} rounds of {args.duration:g} s each"
    )
    for name, values in rates.items():
        print(
            f"{name:8s} rows/s median {statistics.median(values):7.1f}  "
            f"({min(values):.0f}-{max(values):.0f})"
        )
    for name, values in ratios.items():
        print(
            f"{name} ÷ raw, median of the rounds' ratios {statistics.median(values):.3f} "
            f"({min(values):.3f}-{max(values):.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
