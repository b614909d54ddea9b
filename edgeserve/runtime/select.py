"""Backend choice: a named backend loads as it is; `auto` picks one for this box.

Neither backend wins everywhere. On a tiny model ONNX Runtime's per call cost is a
quarter of OpenVINO's (models/README.md, digits); OpenVINO's own INT8 form beats ONNX
Runtime's on MiniLM. So when the caller passes samples (the registry passes its warm-up
inputs), `auto` loads every backend that can run the files, times each on the samples,
taking turns so that drift on a busy box hits both alike, and keeps the faster one.
Without samples (batch jobs, Spark executors, bundle validation) `auto` prefers OpenVINO
and falls back to ONNX Runtime, as it always has.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from edgeserve.errors import InferenceFailed
from edgeserve.runtime.base import Runtime, RuntimeLoadError, ThreadPlan

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "openvino")
# Timed calls per backend and sample, after one untimed call; fewer when a sample's calls
# take longer than SAMPLE_BUDGET_S together (a large model on a slow box).
TIMED_CALLS = 7
SAMPLE_BUDGET_S = 0.5

Feed = Mapping[str, np.ndarray]
# The inputs to time a loaded runtime on (both backends read the same signature).
Samples = Callable[[Runtime], Sequence[Feed]]
# Seconds per call of each runtime on the samples, by backend name.
Timer = Callable[[Sequence[Runtime], Sequence[Feed]], dict[str, float]]


def time_calls(runtimes: Sequence[Runtime], feeds: Sequence[Feed]) -> dict[str, float]:
    """Seconds per call of each runtime: per feed the median of its timed calls, then the
    geometric mean over the feeds, so that a one-row and a large batch count alike. A
    runtime that fails on a feed is left out of the answer."""
    logs: dict[str, list[float]] = {r.backend: [] for r in runtimes}
    for feed in feeds:
        timed: dict[str, list[float]] = {}
        for runtime in runtimes:  # the first call allocates; it is not timed
            if runtime.backend in logs and _seconds(runtime, feed) is not None:
                timed[runtime.backend] = []
        ends = time.perf_counter() + SAMPLE_BUDGET_S
        for _ in range(TIMED_CALLS):
            for runtime in runtimes:
                if runtime.backend in timed:
                    seconds = _seconds(runtime, feed)
                    if seconds is None:
                        del timed[runtime.backend]
                    else:
                        timed[runtime.backend].append(seconds)
            if time.perf_counter() > ends:
                break
        for backend in list(logs):
            if backend in timed:
                logs[backend].append(math.log(max(statistics.median(timed[backend]), 1e-9)))
            else:
                del logs[backend]
    return {b: math.exp(sum(v) / len(v)) for b, v in logs.items() if v}


def _seconds(runtime: Runtime, feed: Feed) -> float | None:
    """One call's duration, or None when the runtime cannot compute `feed`."""
    began = time.perf_counter()
    try:
        runtime.run(feed)
    except InferenceFailed:
        return None
    return time.perf_counter() - began


def create_runtime(
    backend: str,
    files: Mapping[str, bytes],
    threads: ThreadPlan,
    model: str = "?",
    *,
    samples: Samples | None = None,
    timer: Timer = time_calls,
) -> Runtime:
    """Load `files` into the named backend. `auto` with `samples` keeps the faster of the
    backends that load; without, it prefers OpenVINO. A fallback is logged with its reason."""
    if backend == "openvino":
        return _load("openvino", files, threads)
    if backend == "onnxruntime":
        return _load("onnxruntime", files, threads)
    if backend != "auto":
        raise RuntimeLoadError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
    try:
        preferred = _load("openvino", files, threads)
    except RuntimeLoadError as exc:
        if "model.onnx" not in files:
            raise
        log.info(
            "backend fallback model=%s from=openvino to=onnxruntime reason=%r", model, str(exc)
        )
        return _load("onnxruntime", files, threads)
    if samples is None or "model.onnx" not in files:
        return preferred
    try:
        other = _load("onnxruntime", files, threads)
    except RuntimeLoadError as exc:
        log.info("backend choice model=%s onnxruntime_unusable reason=%r", model, str(exc))
        return preferred
    return _faster(model, [preferred, other], samples(preferred), timer)


def _faster(model: str, runtimes: list[Runtime], feeds: Sequence[Feed], timer: Timer) -> Runtime:
    """The runtime the timer measured fastest (the first when none could be measured);
    the others are closed."""
    seconds = timer(runtimes, feeds) if feeds else {}
    measured = [r for r in runtimes if r.backend in seconds]
    best = min(measured, key=lambda r: seconds[r.backend]) if measured else runtimes[0]
    for runtime in runtimes:
        if runtime is not best:
            runtime.close()
    log.info(
        "backend chosen model=%s backend=%s %s",
        model,
        best.backend,
        " ".join(f"{r.backend}_us={seconds[r.backend] * 1e6:.0f}" for r in measured)
        or "unmeasured",
    )
    return best


def _load(backend: str, files: Mapping[str, bytes], threads: ThreadPlan) -> Runtime:
    runtime: Runtime
    if backend == "openvino":
        from edgeserve.runtime.openvino import OpenVinoRuntime

        runtime = OpenVinoRuntime(threads)
    else:
        from edgeserve.runtime.onnx import OnnxRuntime

        runtime = OnnxRuntime(threads)
    runtime.load(files)
    return runtime
