"""The KServe V2 gRPC service over a real loopback socket, driven by `tritonclient.grpc`."""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.serving import run_server
from tests.test_batching_server import CLASSES, WEIGHTS, WIDTH, write_repository
from tests.waiting import wait_until

TOMLS = {
    "linear": 'backend = "onnxruntime"\nmax_batch_size = 8\n'
    "[batching]\npreferred_batch_size = 4\n[cache]\nenabled = true\n",
    "held": 'backend = "onnxruntime"\nmax_batch_size = 4\n'
    "[batching]\nmax_queue_delay_ms = 1000\nmax_queue_size = 2\nwait_when_idle = true\n",
}


@pytest.fixture(scope="module")
def grpc_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    repo = write_repository(tmp_path_factory.mktemp("repo"), TOMLS)
    folder = tmp_path_factory.mktemp("server")
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{folder / "state"}"\n[models]\nrepository = "{repo}"\n'
        "[auth]\nenabled = false\n"
    )
    with run_server(folder, config_text=config) as server:
        yield server.grpc_address()


@pytest.fixture(scope="module")
def client(grpc_url: str) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(grpc_url) as c:
        yield c


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("linear")
    assert "binary_tensor_data" in client.get_server_metadata().extensions
    meta = client.get_model_metadata("linear", "1")
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, WIDTH])
    ]
    assert {t.name for t in meta.outputs} == {"scores", "label"}
    config = client.get_model_config("linear").config
    assert config.max_batch_size == 8
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert list(config.input[0].dims) == [WIDTH]


def test_infer_returns_each_row(client: triton.InferenceServerClient) -> None:
    rows = np.random.default_rng(3).normal(size=(3, WIDTH)).astype(np.float32)
    data = triton.InferInput("input", list(rows.shape), "FP32")
    data.set_data_from_numpy(rows)
    result = client.infer(
        "linear", [data], outputs=[triton.InferRequestedOutput("scores")], request_id="g-1"
    )
    assert result.get_response().id == "g-1"
    assert result.as_numpy("label") is None
    scores = result.as_numpy("scores")
    assert scores.shape == (3, CLASSES)
    np.testing.assert_allclose(scores, rows @ WEIGHTS, rtol=1e-4, atol=1e-4)
    labels = client.infer("linear", [data]).as_numpy("label")
    assert labels.tolist() == (rows @ WEIGHTS).argmax(axis=1).tolist()


def test_typed_contents_are_accepted(grpc_url: str) -> None:
    """Clients other than tritonclient may send `contents.fp32_contents` instead of raw bytes."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    row = np.arange(WIDTH, dtype=np.float32) / WIDTH
    request = pb.ModelInferRequest(model_name="linear")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, WIDTH])
    tensor.contents.fp32_contents.extend(row.tolist())
    with grpc.insecure_channel(grpc_url) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    names = [o.name for o in reply.outputs]
    scores = np.frombuffer(reply.raw_output_contents[names.index("scores")], "<f4")
    np.testing.assert_allclose(scores, row @ WEIGHTS, rtol=1e-4, atol=1e-4)


def _infer_error(client: triton.InferenceServerClient, model: str, rows: np.ndarray, **kw) -> str:
    data = triton.InferInput("input", list(rows.shape), triton_dtype(rows))
    data.set_data_from_numpy(rows)
    with pytest.raises(InferenceServerException) as failed:
        client.infer(model, [data], **kw)
    return failed.value.status()


def triton_dtype(rows: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(rows.dtype)


@pytest.mark.parametrize(
    ("model", "rows", "status"),
    [
        ("nope", np.ones((1, WIDTH), np.float32), "StatusCode.NOT_FOUND"),
        ("linear", np.ones((1, WIDTH + 1), np.float32), "StatusCode.INVALID_ARGUMENT"),
        ("linear", np.ones((1, WIDTH), np.float64), "StatusCode.INVALID_ARGUMENT"),
        ("linear", np.ones((9, WIDTH), np.float32), "StatusCode.INVALID_ARGUMENT"),
    ],
    ids=["unknown-model", "wrong-shape", "wrong-dtype", "over-max-batch"],
)
def test_errors_map_to_grpc_status_codes(
    client: triton.InferenceServerClient, model: str, rows: np.ndarray, status: str
) -> None:
    assert _infer_error(client, model, rows) == status


def test_deadline_is_deadline_exceeded(client: triton.InferenceServerClient) -> None:
    rows = np.ones((1, WIDTH), np.float32)
    status = _infer_error(client, "held", rows, timeout=150_000)  # Triton's parameter, µs
    assert status == "StatusCode.DEADLINE_EXCEEDED"


def test_statistics_and_repository_index(client: triton.InferenceServerClient) -> None:
    rows = np.full((1, WIDTH), 0.5, np.float32)
    data = triton.InferInput("input", [1, WIDTH], "FP32")
    data.set_data_from_numpy(rows)
    client.infer("linear", [data])
    client.infer("linear", [data])
    stats = client.get_inference_statistics("linear").model_stats[0]
    assert stats.inference_stats.success.count >= 2
    assert stats.inference_stats.cache_hit.count >= 1
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count
    # a cache hit computes nothing: in none of the compute counters, which stay equal
    # (perf_analyzer refuses counts that differ), as in Triton
    s = stats.inference_stats
    assert s.compute_input.count == s.compute_infer.count == s.compute_output.count
    assert s.compute_infer.count == s.success.count - s.cache_hit.count
    index = client.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models} >= {
        ("linear", "1", "READY"),
        ("held", "1", "READY"),
    }


def test_full_queue_is_resource_exhausted(grpc_url: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(_: int) -> str:
        rows = np.ones((1, WIDTH), np.float32)
        data = triton.InferInput("input", [1, WIDTH], "FP32")
        data.set_data_from_numpy(rows)
        with triton.InferenceServerClient(grpc_url) as c:
            try:
                c.infer("held", [data], client_timeout=30)
            except InferenceServerException as exc:
                return exc.status()
        return "OK"

    with ThreadPoolExecutor(5) as pool:
        outcomes = sorted(pool.map(one, range(5)))
    assert outcomes == ["OK", "OK"] + ["StatusCode.RESOURCE_EXHAUSTED"] * 3


def test_stream_answers_every_request_and_survives_a_bad_one(grpc_url: str) -> None:
    """tritonclient's start_stream / async_stream_infer (ModelStreamInfer): each request
    gets its own rows back under its id; a bad request gets an error and the stream goes on."""
    rows = np.random.default_rng(5).normal(size=(12, WIDTH)).astype(np.float32)
    answers: list[tuple[object, object]] = []
    done = threading.Event()

    def on_reply(result: object, error: object) -> None:
        answers.append((result, error))
        if len(answers) == len(rows) + 1:
            done.set()

    with triton.InferenceServerClient(grpc_url) as client:
        client.start_stream(callback=on_reply)
        for i, row in enumerate(rows):
            data = triton.InferInput("input", [1, WIDTH], "FP32")
            data.set_data_from_numpy(row[None, :])
            client.async_stream_infer("linear", [data], request_id=f"s-{i}")
            if i == 5:
                bad = triton.InferInput("pixels", [1, WIDTH], "FP32")
                bad.set_data_from_numpy(row[None, :])
                client.async_stream_infer("linear", [bad], request_id="s-bad")
        assert done.wait(30), f"{len(answers)} of {len(rows) + 1} answers arrived"
        client.stop_stream()
    errors = [e for _, e in answers if e is not None]
    assert len(errors) == 1 and "unknown input 'pixels'" in str(errors[0])
    labels = {r.get_response().id: r.as_numpy("label").tolist() for r, e in answers if e is None}
    expected = (rows @ WEIGHTS).argmax(axis=1)
    assert labels == {f"s-{i}": [int(expected[i])] for i in range(len(rows))}


def test_grpc_inferences_leave_telemetry_records(tmp_path: Path) -> None:
    """Served or refused, over ModelInfer or the stream: a record each, the caller's
    subject hashed, as over HTTP."""
    repo = write_repository(tmp_path / "repo", {"linear": TOMLS["linear"]})
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{tmp_path / "state"}"\n[models]\nrepository = "{repo}"\n'
        "[auth]\nenabled = false\n"
    )
    data = triton.InferInput("input", [1, WIDTH], "FP32")
    data.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
    bad = triton.InferInput("pixels", [1, WIDTH], "FP32")
    bad.set_data_from_numpy(np.ones((1, WIDTH), np.float32))
    with run_server(tmp_path, config_text=config) as server:
        with triton.InferenceServerClient(server.grpc_address()) as client:
            who = {"x-user-id": "alice@example.com"}
            client.infer("linear", [data], request_id="g-ok", headers=who)
            with pytest.raises(InferenceServerException):
                client.infer("linear", [bad], request_id="g-bad")
            replies: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: replies.put(error))
            client.async_stream_infer("linear", [data], request_id="g-stream")
            assert replies.get(timeout=30) is None
            client.stop_stream()

        def three_rows() -> dict[str, tuple] | None:  # the writer thread commits them
            with sqlite3.connect(tmp_path / "state" / "telemetry.db") as db:
                rows = {
                    r[0]: r[1:]
                    for r in db.execute(
                        "SELECT request_id, model, version, status, subject_hash FROM inferences"
                    )
                }
            return rows if len(rows) >= 3 else None

        rows = wait_until(three_rows, 30, "three telemetry rows", interval_s=0.2)
    assert rows["g-ok"][:3] == ("linear", "1", 200)
    assert rows["g-ok"][3] and "alice" not in rows["g-ok"][3]
    assert rows["g-bad"][:3] == ("linear", "1", 400)
    assert rows["g-stream"][:3] == ("linear", "1", 200)
