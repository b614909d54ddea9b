"""The OpenVINO runtime under the server's thread plan: one stream per concurrent caller,
reused infer requests, and the same answers however many executor threads call at once."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from edgeserve.runtime import RuntimeLoadError, ThreadPlan, create_runtime
from edgeserve.runtime.openvino import OpenVinoRuntime
from edgeserve.serving.registry import Registry
from edgeserve.serving.repository import BatchingConfig, ThreadConfig, read_model
from tests.serving import MODELS

DIGITS = read_model(MODELS / "digits")
X = np.load(MODELS / "digits" / "heldout.npz")["X"].astype(np.float32)
CORES = os.cpu_count() or 1


def openvino(version: int, plan: ThreadPlan) -> OpenVinoRuntime:
    runtime = create_runtime("openvino", DIGITS.read_files(version), plan)
    assert isinstance(runtime, OpenVinoRuntime)
    return runtime


@pytest.mark.parametrize("streams", [1, 2])
def test_streams_follow_the_thread_plan(streams: int) -> None:
    runtime = openvino(1, ThreadPlan(intra_op=1, streams=streams))
    compiled = runtime._compiled
    expected = min(streams, CORES)  # the CPU plugin caps streams at the cores
    assert runtime.streams == expected
    assert int(compiled.get_property("INFERENCE_NUM_THREADS")) == expected
    assert str(compiled.get_property("PERFORMANCE_HINT")) == (
        "THROUGHPUT" if expected > 1 else "LATENCY"
    )
    assert compiled.get_property("ENABLE_CPU_PINNING") is False  # the server's threads roam


def test_the_f32_pin_holds_with_several_streams() -> None:
    runtime = openvino(1, ThreadPlan(intra_op=1, streams=2))
    assert str(runtime._compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"


@pytest.mark.parametrize("version", DIGITS.versions)
def test_concurrent_runs_answer_as_a_single_thread_does(version: int) -> None:
    """Several threads call one runtime at once, more threads than streams, with batches of
    different sizes; every caller gets exactly the rows a lone caller gets."""
    runtime = openvino(version, ThreadPlan(intra_op=1, streams=2))
    chunks = [
        X[i : i + size] for i, size in zip(range(0, 300, 30), [1, 3, 8, 16, 30] * 2, strict=True)
    ]
    expected = [runtime.run({"input": c}) for c in chunks]
    callers, rounds = 4, 25
    start = threading.Barrier(callers)
    mismatches: list[str] = []

    def call(worker: int) -> None:
        start.wait()
        for r in range(rounds):
            k = (worker + r) % len(chunks)
            got = runtime.run({"input": chunks[k]})
            for name, want in expected[k].items():
                if got[name].shape != want.shape or not np.array_equal(got[name], want):
                    mismatches.append(f"worker {worker} round {r} chunk {k} output {name}")

    with ThreadPoolExecutor(callers) as pool:
        list(pool.map(call, range(callers)))
    assert mismatches == []


def test_a_caller_beyond_the_plan_is_served_not_refused() -> None:
    runtime = openvino(1, ThreadPlan(intra_op=1, streams=1))
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda c: runtime.run({"input": c})["label"], [X[:5]] * 12))
    assert all(np.array_equal(r, results[0]) for r in results)


def load_with(executor_threads: int, plan: ThreadPlan, **config_changes: object) -> ThreadPlan:
    """The thread plan the registry hands the runtime of digits v1."""
    config = replace(DIGITS.config, backend="openvino", **config_changes)
    with ThreadPoolExecutor(executor_threads) as executor:
        registry = Registry(executor, executor_threads, plan, warmup=False)

        async def load() -> ThreadPlan:
            loaded = await registry.load("digits", 1, config, DIGITS.read_files(1))
            assert loaded is not None
            await registry.close()
            return loaded.runtime.threads

        return asyncio.run(load())


def test_the_registry_gives_the_runtime_one_stream_per_executor_slot() -> None:
    assert load_with(2, ThreadPlan(intra_op=1)).streams == 2


def test_max_concurrent_batches_caps_the_streams() -> None:
    plan = load_with(2, ThreadPlan(), batching=BatchingConfig(max_concurrent_batches=1))
    assert plan.streams == 1


def test_a_model_without_batching_gets_every_executor_slot() -> None:
    plan = load_with(
        2, ThreadPlan(), max_batch_size=0, batching=BatchingConfig(max_concurrent_batches=1)
    )
    assert plan.streams == 2


def test_per_model_intra_op_threads_keep_the_servers_precision() -> None:
    plan = load_with(
        1, ThreadPlan(intra_op=1, precision="bf16"), threads=ThreadConfig(intra_op_threads=2)
    )
    assert (plan.intra_op, plan.precision, plan.streams) == (2, "bf16", 1)


def test_fallback_reason_is_openvinos_message_not_its_source_location(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The text model has string ops OpenVINO cannot convert: `auto` falls back to ONNX
    Runtime, and the logged reason is OpenVINO's message, not `Exception from
    src/inference/src/cpp/core.cpp:105:` (the first line of its exception text)."""
    files = read_model(MODELS / "text").read_files(1)
    with caplog.at_level("INFO", logger="edgeserve.runtime.select"):
        runtime = create_runtime("auto", files, ThreadPlan(1, 1), model="text")
    assert runtime.backend == "onnxruntime"
    [fallback] = [r.getMessage() for r in caplog.records if "backend fallback" in r.getMessage()]
    reason = fallback.split("reason=", 1)[1]
    assert "core.cpp" not in reason and "Exception from" not in reason
    assert "OpConversionFailure" in reason
    assert "No conversion rule found for operations: StringNormalizer-20" in reason


def test_unreadable_model_names_openvinos_reason() -> None:
    with pytest.raises(RuntimeLoadError) as refused:
        create_runtime("openvino", {"model.onnx": b"not a model"}, ThreadPlan(1, 1))
    message = str(refused.value)
    assert message.startswith("openvino could not load the model: Unable to read the model.")
    assert "cpp:" not in message
