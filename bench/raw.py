"""The limit the server chases: the runtime called in-process on the same inputs.

Run as its own process (`python -m bench.raw <spec.json>`), alone on the box, and prints
one JSON line. Measures, for each thread plan (executor threads x intra-op threads):
batch 1 calls/s with one caller, and rows/s for each batch size with every executor
thread calling at once; then the sweep's three best points again, three times each
(the best median is the reference the server is compared with). The runtime is built
as the server builds it (`create_runtime` with the plan, one OpenVINO stream per
executor thread). For OpenVINO also a reference: the THROUGHPUT hint with a
free-running AsyncInferQueue, in the served precision. With a "point" in the spec it
measures only that plan and batch, once (a bracket around a server run).
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.runtime import ThreadPlan, create_runtime
from edgeserve.serving.repository import ModelSource, read_model

BEST_CANDIDATES = 3  # the sweep's best points measured again
BEST_RERUNS = 3  # runs of each


def feeds_for(inputs: dict[str, np.ndarray], batch: int, count: int) -> list[dict[str, np.ndarray]]:
    """`count` batches of `batch` rows, cycling over the sample rows."""
    n = len(next(iter(inputs.values())))
    out = []
    for k in range(count):
        idx = [(k * batch + i) % n for i in range(batch)]
        out.append({name: a[idx] for name, a in inputs.items()})
    return out


def timed_calls(
    run: Any, feeds: list[dict], workers: int, duration_s: float
) -> tuple[float, float]:
    """(calls per second, p50 call latency in ms) with `workers` threads calling at once."""
    stop = time.perf_counter() + duration_s
    counts = [0] * workers
    latencies: list[float] = []

    def loop(w: int) -> None:
        i = w
        while time.perf_counter() < stop:
            t = time.perf_counter()
            run(feeds[i % len(feeds)], None)
            if w == 0:
                latencies.append(time.perf_counter() - t)
            counts[w] += 1
            i += workers

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000 if latencies else float("nan")
    return sum(counts) / elapsed, p50


def _model_and_inputs(spec: dict) -> tuple[ModelSource, dict[str, bytes], dict[str, np.ndarray]]:
    """The model version's source and files, and the sample rows, that `spec` names."""
    source = read_model(Path(spec["model_dir"]))
    data = np.load(spec["inputs"], allow_pickle=True)
    return source, source.read_files(spec["version"]), {k: data[k] for k in data.files}


def measure(spec: dict) -> dict:
    source, files, inputs = _model_and_inputs(spec)
    max_batch = max(1, source.config.max_batch_size)
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch]
    cores = spec["cores"]
    precision = spec.get("precision", "f32")  # [models] openvino_precision
    result: dict[str, Any] = {"plans": []}
    for workers, intra in {(cores, 1), (1, cores)}:
        plan = ThreadPlan(intra, 1, precision=precision, streams=workers)  # as the registry's
        runtime = create_runtime(spec["backend"], files, plan)
        warm = feeds_for(inputs, 1, 4)
        for f in warm:
            runtime.run(f, None)
        single, p50 = timed_calls(runtime.run, feeds_for(inputs, 1, 64), 1, spec["duration_s"])
        rows: dict[int, float] = {}
        for b in batches:
            feeds = feeds_for(inputs, b, 16)
            runtime.run(feeds[0], None)
            calls, _ = timed_calls(runtime.run, feeds, workers, spec["duration_s"])
            rows[b] = calls * b
        result["plans"].append(
            {
                "executor": workers,
                "intra": intra,
                "batch1_calls_per_s": single,
                "batch1_p50_ms": p50,
                "rows_per_s": rows,
            }
        )
        runtime.close()
    # The sweep's maximum is the luckiest of a dozen noisy runs, so it overstates the
    # winner, and near-ties are decided by noise. The best few points are measured again
    # and the best median is the reference.
    ranked = sorted(
        ((p, b, r) for p in result["plans"] for b, r in p["rows_per_s"].items()),
        key=lambda t: t[2],
        reverse=True,
    )
    confirmed = []
    for plan_doc, batch, sweep in ranked[:BEST_CANDIDATES]:
        reruns = _reruns(spec, files, inputs, plan_doc, batch, precision)
        confirmed.append((statistics.median(reruns), plan_doc, batch, sweep, reruns))
    median, best_plan, best_batch, sweep, reruns = max(confirmed, key=lambda c: c[0])
    b1 = max(result["plans"], key=lambda p: p["rows_per_s"][1])
    result["batch1_rows_per_s"] = b1["rows_per_s"][1]
    result["batch1_plan"] = f"{b1['executor']}x{b1['intra']}"
    result["batch1_p50_ms"] = min(p["batch1_p50_ms"] for p in result["plans"])
    result["best_sweep_rows_per_s"] = sweep
    result["best_reruns_rows_per_s"] = reruns
    result["best_rows_per_s"] = median
    result["best_batch"] = best_batch
    result["best_plan"] = f"{best_plan['executor']}x{best_plan['intra']}"
    result["candidates"] = [
        {
            "plan": f"{c[1]['executor']}x{c[1]['intra']}",
            "batch": c[2],
            "sweep": c[3],
            "reruns": c[4],
        }
        for c in confirmed
    ]
    if spec["backend"] == "openvino":
        result["openvino_async"] = _openvino_async(files, inputs, spec["duration_s"], precision)
    return result


def _reruns(
    spec: dict,
    files: dict[str, bytes],
    inputs: dict[str, np.ndarray],
    plan_doc: dict,
    batch: int,
    precision: str,
    runs: int = BEST_RERUNS,
) -> list[float]:
    """Rows/s of one plan and batch, `runs` times, on a runtime built afresh."""
    workers = plan_doc["executor"]
    plan = ThreadPlan(plan_doc["intra"], 1, precision=precision, streams=workers)
    runtime = create_runtime(spec["backend"], files, plan)
    feeds = feeds_for(inputs, batch, 16)
    runtime.run(feeds[0], None)
    try:
        return [
            timed_calls(runtime.run, feeds, workers, spec["duration_s"])[0] * batch
            for _ in range(runs)
        ]
    finally:
        runtime.close()


def measure_point(spec: dict) -> dict:
    """Rows/s of one point alone (`spec["point"]`: plan "EXI" and batch), once, for
    `duration_s`: the raw side of a bracket around one server run (bench/run.py)."""
    _, files, inputs = _model_and_inputs(spec)
    executor, intra = (int(n) for n in spec["point"]["plan"].split("x"))
    plan_doc = {"executor": executor, "intra": intra}
    precision = spec.get("precision", "f32")
    batch = spec["point"]["batch"]
    return {"rows_per_s": _reruns(spec, files, inputs, plan_doc, batch, precision, runs=1)[0]}


def _openvino_async(
    files: dict[str, bytes], inputs: dict[str, np.ndarray], duration_s: float, precision: str
) -> dict:
    """THROUGHPUT hint + AsyncInferQueue at batch 1, one thread feeding it: the most the
    server's synchronous calls could hope for. The precision is pinned as the server pins
    it: left alone, OpenVINO computes in bf16 on CPUs with AVX512-BF16, a different model."""
    import openvino as ov

    core = ov.Core()
    if "model.xml" in files:
        weights = ov.Tensor(np.frombuffer(files.get("model.bin", b""), dtype=np.uint8))
        model = core.read_model(files["model.xml"], weights)
    else:
        model = core.read_model(files["model.onnx"], ov.Tensor(np.empty(0, np.uint8)))
    config = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": precision}
    compiled = core.compile_model(model, "CPU", config)
    queue = ov.AsyncInferQueue(compiled)
    feeds = feeds_for(inputs, 1, 64)
    done = [0]

    def on_done(request: Any, userdata: Any) -> None:
        done[0] += 1

    queue.set_callback(on_done)
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < duration_s:
        queue.start_async(feeds[i % len(feeds)])
        i += 1
    queue.wait_all()
    elapsed = time.perf_counter() - start
    return {
        "jobs": len(queue),
        "streams": int(compiled.get_property("NUM_STREAMS")),
        "precision": precision,
        "batch1_rows_per_s": done[0] / elapsed,
    }


if __name__ == "__main__":
    _spec = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(measure_point(_spec) if "point" in _spec else measure(_spec)))
