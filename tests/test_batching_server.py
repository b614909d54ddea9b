"""Batching, admission control, deadlines and the response cache through a real server.

The models are tiny ONNX graphs written into a temporary repository, each with the
model.toml that the behaviour under test needs; results are checked against numpy.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.serving import RunningServer, run_server

WIDTH = 64
CLASSES = 10
WEIGHTS = np.random.default_rng(7).normal(size=(WIDTH, CLASSES)).astype(np.float32)


def linear_model_bytes() -> bytes:
    """input FP32 [-1, 64] -> scores = input @ W, label = argmax(scores)."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "W"], ["scores"]),
            helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, WIDTH])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, CLASSES]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
        ],
        [numpy_helper.from_array(WEIGHTS, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


MODEL_TOMLS = {
    # Waits for company even when idle, so concurrent requests are sure to merge.
    "merging": 'backend = "onnxruntime"\nmax_batch_size = 8\n'
    "[batching]\nmax_queue_delay_ms = 500\nwait_when_idle = true\n",
    # Two queued rows wait 1 s for a batch of 4 that never fills: a held, tiny queue.
    "held": 'backend = "onnxruntime"\nmax_batch_size = 4\n'
    "[batching]\nmax_queue_delay_ms = 1000\nmax_queue_size = 2\nwait_when_idle = true\n",
    "cached": 'backend = "onnxruntime"\nmax_batch_size = 8\n[cache]\nenabled = true\n',
    # One batch at a time using both cores inside the runtime call.
    "threaded": 'backend = "onnxruntime"\nmax_batch_size = 8\n[threads]\nintra_op_threads = 2\n'
    "[batching]\nmax_concurrent_batches = 1\nmax_queue_wait_ms = 0\n",
}


def write_repository(root: Path, tomls: dict[str, str] = MODEL_TOMLS) -> Path:
    blob = linear_model_bytes()
    for name, text in tomls.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "model.toml").write_text(text)
        (root / name / "1" / "model.onnx").write_bytes(blob)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    repo = write_repository(tmp_path_factory.mktemp("repo"))
    with run_server(
        tmp_path_factory.mktemp("server"), "[auth]\nenabled = false\n", repository=repo
    ) as running:
        yield running


def body(rows: np.ndarray, **parameters: object) -> dict:
    doc: dict = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(rows.shape),
                "data": rows.ravel().tolist(),
            }
        ]
    }
    if parameters:
        doc["parameters"] = parameters
    return doc


def infer(server: RunningServer, model: str, rows: np.ndarray, **kwargs: object) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v2/models/{model}/infer", json=body(rows), timeout=30, **kwargs
    )


def stats(server: RunningServer, model: str) -> dict:
    reply = httpx.get(f"{server.url}/v2/models/{model}/stats", timeout=10)
    assert reply.status_code == 200
    return reply.json()["model_stats"][0]


def test_concurrent_requests_are_merged_and_each_caller_gets_its_own_rows(
    server: RunningServer,
) -> None:
    inputs = [
        np.random.default_rng(i).normal(size=(1 + i % 2, WIDTH)).astype(np.float32)
        for i in range(8)
    ]
    before = stats(server, "merging")
    with ThreadPoolExecutor(len(inputs)) as pool:
        replies = list(pool.map(lambda rows: infer(server, "merging", rows), inputs))
    for rows, reply in zip(inputs, replies, strict=True):
        assert reply.status_code == 200, reply.text
        outputs = {o["name"]: o for o in reply.json()["outputs"]}
        scores = np.array(outputs["scores"]["data"], dtype=np.float32).reshape(
            rows.shape[0], CLASSES
        )
        np.testing.assert_allclose(scores, rows @ WEIGHTS, rtol=1e-4, atol=1e-4)
        assert outputs["label"]["data"] == (rows @ WEIGHTS).argmax(axis=1).tolist()
    after = stats(server, "merging")
    requests = (
        after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    )
    calls = after["execution_count"] - before["execution_count"]
    assert requests == len(inputs)
    assert after["inference_count"] - before["inference_count"] == sum(len(r) for r in inputs)
    assert calls < requests  # the runtime saw fewer calls than there were requests
    by_size = {b["batch_size"]: b["compute_infer"]["count"] for b in after["batch_stats"]}
    assert max(by_size) > 2  # at least one call carried several requests' rows
    assert sum(by_size.values()) == after["execution_count"]


def test_full_queue_refuses_at_once_with_429_and_retry_after(server: RunningServer) -> None:
    rows = np.ones((1, WIDTH), np.float32)
    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda _: infer(server, "held", rows), range(5)))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200, 200, 429, 429, 429]
    refused = next(r for r in replies if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert "queue is full" in refused.json()["error"]


@pytest.mark.parametrize(
    "how",
    [
        {"headers": {"X-Request-Timeout-Ms": "150"}},
        {"parameters": {"timeout": 150_000}},  # Triton's request parameter, microseconds
    ],
    ids=["header", "triton-parameter"],
)
def test_expired_deadline_gets_504_and_is_not_computed(server: RunningServer, how: dict) -> None:
    before = stats(server, "held")
    doc = body(np.ones((1, WIDTH), np.float32), **how.get("parameters", {}))
    reply = httpx.post(
        f"{server.url}/v2/models/held/infer", json=doc, headers=how.get("headers"), timeout=30
    )
    assert reply.status_code == 504, reply.text
    assert "deadline" in reply.json()["error"]
    after = stats(server, "held")
    assert after["execution_count"] == before["execution_count"]
    assert (
        after["inference_stats"]["fail"]["count"] == before["inference_stats"]["fail"]["count"] + 1
    )


@pytest.mark.parametrize("bad", ["0", "-5", "soon"])
def test_bad_timeout_header_is_a_400(server: RunningServer, bad: str) -> None:
    reply = infer(
        server, "merging", np.ones((1, WIDTH), np.float32), headers={"X-Request-Timeout-Ms": bad}
    )
    assert reply.status_code == 400
    assert "X-Request-Timeout-Ms" in reply.json()["error"]


def test_cache_hit_is_counted_and_returns_the_same_answer(server: RunningServer) -> None:
    rows = np.random.default_rng(99).normal(size=(2, WIDTH)).astype(np.float32)
    first = infer(server, "cached", rows)
    second = infer(server, "cached", rows)
    assert first.status_code == second.status_code == 200
    assert first.json()["outputs"] == second.json()["outputs"]
    inference = stats(server, "cached")["inference_stats"]
    assert inference["cache_hit"]["count"] == 1
    assert inference["cache_miss"]["count"] == 1


def test_per_model_threads_and_one_batch_at_a_time(server: RunningServer) -> None:
    inputs = [np.full((1, WIDTH), i, np.float32) for i in range(6)]
    with ThreadPoolExecutor(len(inputs)) as pool:
        replies = list(pool.map(lambda rows: infer(server, "threaded", rows), inputs))
    for rows, reply in zip(inputs, replies, strict=True):
        assert reply.status_code == 200, reply.text
        label = next(o for o in reply.json()["outputs"] if o["name"] == "label")["data"]
        assert label == (rows @ WEIGHTS).argmax(axis=1).tolist()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[batching]\nmax_queue_wait_ms = -1\n", "batching.max_queue_wait_ms"),
        ("[batching]\nwait_when_idel = true\n", "unknown key"),
        ("[cache]\nmax_bytes = 10\n", "cache.max_bytes"),
        ("[threads]\nintra_op = 2\n", "unknown key"),
        ("[batching]\npreferred_batch_size = 9\n", "larger than max_batch_size"),
        ("[batching]\npreferred_batch_size = -1\n", "batching.preferred_batch_size"),
        ("[batching]\noverload_queue_wait_ms = -5\n", "batching.overload_queue_wait_ms"),
        ('[batching]\noverload_queue_wait_ms = "5"\n', "batching.overload_queue_wait_ms"),
    ],
)
def test_model_toml_refuses_bad_batching_cache_and_thread_keys(text: str, problem: str) -> None:
    from edgeserve.config.schema import ConfigError
    from edgeserve.serving.repository import parse_model_config

    with pytest.raises(ConfigError, match=problem):
        parse_model_config("max_batch_size = 8\n" + text, "m/model.toml")
