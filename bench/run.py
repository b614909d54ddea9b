"""One benchmark run: raw runtime, edgeserve (both engines), MLServer, overload, start-up.

    python -m bench.run                      # every demo model found under models/
    python -m bench.run --models digits --duration 5 --markdown /tmp/out.md

Everything runs on this box, one thing at a time: the raw runtime alone, then each
server alone with the load generator. Prints the tables; `--markdown` and `--json`
also write them. Not part of the test suite; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import loadgen, servers, synthetic, workload
from bench.report import render
from edgeserve.repository import read_model

MODELS = servers.ROOT / "models"
MIB = 1024 * 1024


@dataclass
class Target:
    folder: Path
    model: str
    version: int
    backend: str
    label: str
    concurrencies: list[int]
    engines: list[str]
    peer: bool
    heavy: bool = False  # compute-bound: also try one batch at a time on every core
    results: dict[str, Any] = field(default_factory=dict)


ONE_BATCH_ALL_CORES = (
    "[threads]\nintra_op_threads = {cores}\n[batching]\nmax_concurrent_batches = 1\n"
)


def precision_of(version_dir: Path) -> str:
    """INT8 when the graph holds quantized operators (their names are plain in the file)."""
    for name in ("model.onnx", "model.xml"):
        path = version_dir / name
        if path.is_file():
            blob = path.read_bytes()
            quantized = (b"MatMulInteger", b"QuantizeLinear", b"FakeQuantize", b"QLinear")
            return "INT8" if any(op in blob for op in quantized) else "FP32"
    return "?"


def discover(names: list[str] | None, engines: list[str]) -> list[Target]:
    """digits on ONNX Runtime (comparable with the peer); each MiniLM version on both backends."""
    targets = []
    for folder in sorted(p for p in MODELS.iterdir() if (p / "model.toml").is_file()):
        if names and folder.name not in names:
            continue
        source = read_model(folder)
        if folder.name.startswith("minilm"):
            for version in source.versions:
                files = {p.name for p in (folder / str(version)).iterdir()}
                backends = ["onnxruntime"] if "model.onnx" in files else []
                backends.append("openvino")
                precision = precision_of(folder / str(version))
                for backend in backends:
                    targets.append(
                        Target(
                            folder,
                            folder.name,
                            version,
                            backend,
                            f"{folder.name} v{version} {precision} {backend}",
                            [1, 16, 32],
                            engines[-1:],
                            peer=precision == "INT8" and backend == "onnxruntime",
                            heavy=True,
                        )
                    )
        elif (folder / str(source.config.default_version or max(source.versions))).is_dir():
            version = source.config.default_version or max(source.versions)
            targets.append(
                Target(
                    folder,
                    folder.name,
                    version,
                    "onnxruntime",
                    f"{folder.name} v{version} {precision_of(folder / str(version))} onnxruntime",
                    [1, 16],
                    engines,
                    peer=True,
                )
            )
    return targets


def measure_target(target: Target, work: Path, duration_s: float) -> None:
    folder = target.folder
    specs = workload.signature(folder, target.version, target.backend)
    rows = workload.sample_rows(folder, specs)
    bodies = workload.bodies(specs, rows)
    path = f"/v2/models/{target.model}/infer"
    inputs = work / f"{target.label.replace(' ', '_')}.npz"
    np.savez(inputs, **rows)
    spec = {
        "model_dir": str(folder),
        "version": target.version,
        "backend": target.backend,
        "inputs": str(inputs),
        "cores": psutil.cpu_count(logical=False) or 1,
        "duration_s": min(3.0, duration_s / 3),
    }
    spec_path = work / "raw-spec.json"
    spec_path.write_text(json.dumps(spec))
    print(f"== {target.label}: raw runtime", flush=True)
    out = subprocess.run(
        [sys.executable, "-m", "bench.raw", str(spec_path)],
        capture_output=True,
        text=True,
        cwd=servers.ROOT,
        timeout=900,
    )
    target.results["raw"] = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout else None
    if out.returncode:
        print(out.stderr[-2000:], flush=True)
    target.results["servers"] = {}
    variants = [(engine, "", "") for engine in target.engines]
    if target.heavy:
        plan = ONE_BATCH_ALL_CORES.format(cores=spec["cores"])
        variants.append((target.engines[-1], f", 1 batch x {spec['cores']} threads", plan))
    for engine, suffix, extra in variants:
        repo = servers.write_repository(
            Path(tempfile.mkdtemp(dir=work)), folder, target.version, target.backend, extra
        )
        name = f"edgeserve ({engine}{suffix})"
        with servers.edgeserve(work / f"es-{engine}", repo, engine) as srv:
            target.results["servers"][name] = _drive(
                name, target, srv.url, path, bodies, duration_s
            )
    if target.peer and servers.mlserver_available():
        try:
            with servers.mlserver(
                Path(tempfile.mkdtemp(dir=work)), folder, target.version, target.model, 1
            ) as peer:
                target.results["peer"] = _drive(
                    "MLServer", target, peer.url, path, bodies, duration_s
                )
        except (RuntimeError, TimeoutError) as exc:
            print(f"MLServer failed: {str(exc)[-500:]}", flush=True)


def _drive(
    name: str, target: Target, url: str, path: str, bodies: list[bytes], duration_s: float
) -> list[dict]:
    loadgen.run_wrk(url, path, bodies, max(target.concurrencies), 3)  # warm-up, discarded
    runs = []
    for c in target.concurrencies:
        r = loadgen.run_wrk(url, path, bodies, c, duration_s)
        print(
            f"   {name:22s} c={c:<3d} {r.req_per_s:9.0f} req/s  p50 {r.p50_ms:7.2f} ms  "
            f"p99 {r.p99_ms:7.2f} ms  non-2xx {r.refused}",
            flush=True,
        )
        runs.append(asdict(r))
    return runs


def overload(target: Target, work: Path, engine: str, seconds: float) -> dict[str, Any]:
    """4x capacity for `seconds`: accepted latency vs unloaded, refusals, memory."""
    folder = target.folder
    specs = workload.signature(folder, target.version, target.backend)
    bodies = workload.bodies(specs, workload.sample_rows(folder, specs))
    path = f"/v2/models/{target.model}/infer"
    runs = target.results["servers"][f"edgeserve ({engine})"]
    capacity = max(r["req_per_s"] for r in runs)
    busiest = max(target.concurrencies)
    repo = servers.write_repository(
        Path(tempfile.mkdtemp(dir=work)), folder, target.version, target.backend
    )
    result: dict[str, Any] = {"label": f"{target.label} ({engine})", "capacity_req_per_s": capacity}
    open_loop = capacity * 4 < 2500  # beyond that a Python client cannot keep the schedule
    with servers.edgeserve(work / "overload", repo, engine) as srv:
        loadgen.run_wrk(srv.url, path, bodies, busiest, 3)
        if open_loop:
            print(
                f"== overload {target.label}: open loop, capacity {capacity:.0f} req/s", flush=True
            )
            with srv.sampling_rss() as base_rss:
                base = loadgen.run_open_loop(srv.url, path, bodies, capacity * 0.5, 10, 256)
            with srv.sampling_rss() as rss:
                over = loadgen.run_open_loop(srv.url, path, bodies, capacity * 4, seconds, 1024)
            result["baseline_offered"] = f"{capacity * 0.5:.0f} req/s (0.5×)"
            result["overload_offered"] = f"{capacity * 4:.0f} req/s (4×)"
        else:
            print(
                f"== overload {target.label}: wrk {busiest} vs {busiest * 4} connections",
                flush=True,
            )
            with srv.sampling_rss() as base_rss:
                base = loadgen.run_wrk(srv.url, path, bodies, busiest, 10)
            with srv.sampling_rss() as rss:
                over = loadgen.run_wrk(srv.url, path, bodies, busiest * 4, seconds)
            result["baseline_offered"] = f"{busiest} conns (closed loop)"
            result["overload_offered"] = f"{busiest * 4} conns (closed loop, 4×)"
        result["baseline"] = asdict(base)
        result["overload"] = asdict(over)
        result["baseline_max_rss_mib"] = max(base_rss or [0]) / MIB
        result["overload_max_rss_mib"] = max(rss or [0]) / MIB
        result["after_rss_mib"] = srv.rss_bytes() / MIB
    for phase, r in (("baseline", base), ("overload", over)):
        print(
            f"   {phase:9s} {r.req_per_s:7.0f}/s ok {r.ok} refused {r.refused} errors {r.errors} "
            f"p99 {r.ok_p99_ms or r.p99_ms:.2f} ms",
            flush=True,
        )
    return result


def startup(work: Path, engine: str, names: list[str]) -> dict[str, Any]:
    """Start-to-ready and idle RSS with the demo models loaded from models/ as shipped."""
    with servers.edgeserve(work / "startup", MODELS, engine) as srv:
        time.sleep(2)  # let warm-up allocations settle before reading idle memory
        return {
            "engine": engine,
            "models": names,
            "ready_s": srv.ready_s,
            "idle_rss_mib": srv.rss_bytes() / MIB,
        }


def environment(duration_s: float) -> dict[str, Any]:
    import onnxruntime
    import openvino

    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split()
    mlserver = ""
    if servers.mlserver_available():
        mlserver = subprocess.run(
            [str(servers.MLSERVER_VENV / "bin" / "mlserver"), "--version"],
            capture_output=True,
            text=True,
        ).stdout.split()[-1:]
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": psutil.cpu_count(logical=False),
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__.split("-")[0],
        "wrk": wrk[1] if len(wrk) > 1 else "?",
        "mlserver": mlserver[0] if mlserver else "",
        "duration_s": duration_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated model names (default: all)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per load point")
    parser.add_argument("--overload-s", type=float, default=30.0)
    parser.add_argument("--engines", default="hypercorn,uvicorn")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--json", type=Path, help="also write raw results here")
    parser.add_argument(
        "--no-synthetic", action="store_true", help="skip the synthetic MLP when MiniLM is absent"
    )
    args = parser.parse_args(argv)
    if not loadgen.have_wrk():
        print("bench: wrk is needed (apt-get install -y wrk)", file=sys.stderr)
        return 1
    engines = args.engines.split(",")
    names = args.models.split(",") if args.models else None
    targets = discover(names, engines)
    results: dict[str, Any] = {"env": environment(args.duration), "targets": [], "overload": []}
    with tempfile.TemporaryDirectory(prefix="edgeserve-bench-") as tmp:
        work = Path(tmp)
        results["startup"] = startup(work, engines[-1], sorted({t.model for t in targets}))
        if not any(t.model.startswith("minilm") for t in targets) and not args.no_synthetic:
            folder = synthetic.build_mlp(work / "synthetic")
            targets.append(
                Target(
                    folder,
                    folder.name,
                    1,
                    "onnxruntime",
                    f"{folder.name} v1 onnxruntime",
                    [1, 16, 32],
                    engines[-1:],
                    peer=True,
                    heavy=True,
                )
            )
        for target in targets:
            measure_target(target, work, args.duration)
            results["targets"].append(
                {"label": target.label, "rows_per_request": 1, **target.results}
            )
        heavy = [t for t in targets if t.model.startswith(("minilm", "mlp-synthetic"))]
        int8 = [t for t in heavy if "int8" in t.label.lower() and t.backend == "onnxruntime"]
        chosen = int8[:1] or heavy[:1]
        stressed = [*targets[:1], *(t for t in chosen if t is not targets[0])]
        for target in stressed:
            if target.results.get("servers"):
                results["overload"].append(overload(target, work, engines[-1], args.overload_s))
    text = render(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
