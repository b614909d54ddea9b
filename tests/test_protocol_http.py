"""The Open Inference Protocol over a real HTTP socket: existing clients, and errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.serving import MODELS, RunningServer

HELDOUT = np.load(MODELS / "digits" / "heldout.npz")


def _client(server: RunningServer) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url.removeprefix("http://"))


def test_tritonclient_reads_health_and_metadata(server: RunningServer) -> None:
    client = _client(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("digits", "1")
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "label"}
    assert client.get_model_config("digits")["max_batch_size"] > 0


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_infers_each_row_of_a_batch(server: RunningServer, binary: bool) -> None:
    rows = HELDOUT["X"][:5]
    data = triton.InferInput("input", list(rows.shape), "FP32")
    data.set_data_from_numpy(rows, binary_data=binary)
    wanted = [triton.InferRequestedOutput("label", binary_data=binary)]
    result = _client(server).infer("digits", [data], outputs=wanted, request_id="req-7")
    assert result.get_response()["id"] == "req-7"
    assert result.as_numpy("probabilities") is None  # only what was asked for
    labels = result.as_numpy("label")
    assert labels.shape == (5,)
    single = [_label_of(server, row) for row in rows]
    assert labels.tolist() == single


@pytest.mark.parametrize("version", [1, 2])
def test_auto_serves_the_backend_it_timed_faster_and_says_so(
    server: RunningServer, version: int
) -> None:
    """digits says `backend = "auto"`: each version is timed on both backends at load,
    the log names the faster, and that is the platform the metadata reports."""
    log = server.log()
    timed = re.findall(r"backend chosen model=digits backend=\w+ (\w+)_us=\d+ (\w+)_us=\d+", log)
    assert [sorted(t) for t in timed] == [["onnxruntime", "openvino"]] * 2, log
    ready = re.search(rf"model ready model=digits version={version} backend=(\w+)", log)
    assert ready is not None, log
    platform = _client(server).get_model_metadata("digits", str(version))["platform"]
    assert platform == {"onnxruntime": "onnxruntime_onnx", "openvino": "openvino"}[ready[1]]


def _label_of(server: RunningServer, row: np.ndarray) -> int:
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}],
        "outputs": [{"name": "label"}],
    }
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["outputs"][0]["data"][0]


def test_statistics_and_repository_index(server: RunningServer) -> None:
    client = _client(server)
    _label_of(server, HELDOUT["X"][0])
    stats = client.get_inference_statistics("digits")["model_stats"]
    assert sum(s["inference_stats"]["success"]["count"] for s in stats) >= 1
    index = client.get_model_repository_index()
    assert {"name": "digits", "version": "1", "state": "READY"} in index


def _recorded_accuracy(version: int, backend: str) -> float:
    readme = (MODELS / "README.md").read_text()
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if (
            len(cells) >= 5
            and cells[0] == "digits"
            and cells[1] == str(version)
            and cells[3] == backend
        ):
            return float(re.findall(r"0\.\d+", cells[-1])[0])  # the last column
    raise AssertionError(f"models/README.md records no accuracy for digits {version} {backend}")


@pytest.mark.parametrize("version", [1, 2])
def test_heldout_split_scored_over_http_matches_recorded_accuracy(
    server: RunningServer, version: int
) -> None:
    X, y = HELDOUT["X"], HELDOUT["y"]
    client = _client(server)
    predicted = []
    backend = client.get_model_metadata("digits", str(version))["platform"]
    for start in range(0, len(X), 32):
        rows = X[start : start + 32]
        data = triton.InferInput("input", list(rows.shape), "FP32")
        data.set_data_from_numpy(rows)
        result = client.infer("digits", [data], model_version=str(version))
        predicted.extend(result.as_numpy("label").tolist())
    accuracy = float(np.mean(np.array(predicted) == y))
    recorded = _recorded_accuracy(version, "openvino" if backend == "openvino" else "onnxruntime")
    assert round(accuracy, 3) == pytest.approx(recorded, abs=0.0005)


def _infer_body(**overrides: object) -> dict:
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}
    tensor.update(overrides)
    return {"inputs": [tensor]}


BAD_JSON_REQUESTS = [
    ("malformed JSON", b'{"inputs": [', 400, "not valid JSON"),
    ("body is a list", b"[]", 400, "must be a JSON object"),
    ("no inputs", b"{}", 400, "'inputs' must be a non-empty list"),
    (
        "NaN literal",
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": [NaN]}]}',
        400,
        "not valid JSON",
    ),
    (
        "huge integer",
        b'{"inputs": [{"name": "input", "datatype": "INT64", "shape": [1], "data": ['
        + b"9" * 5000
        + b"]}]}",
        400,
        "not valid JSON",
    ),
]

BAD_TENSORS = [
    ("unknown input name", {"name": "pixels"}, 400, "unknown input 'pixels'"),
    ("wrong datatype", {"datatype": "INT32", "data": [0] * 64}, 400, "must be FP32"),
    ("unknown datatype", {"datatype": "FP8"}, 400, "unknown datatype"),
    ("wrong shape", {"shape": [1, 63], "data": [0.0] * 63}, 400, "has shape [1, 63]"),
    ("too few elements", {"data": [0.0] * 10}, 400, "do not match shape"),
    ("strings as numbers", {"data": ["1"] * 64}, 400, "must be numbers"),
    ("negative dimension", {"shape": [-1, 64]}, 400, "non-negative integers"),
    ("shape bomb", {"shape": [1000000000, 64]}, 413, "exceeds the limit"),
    ("rank 64", {"shape": [1] * 64}, 400, "rank 64 exceeds"),
    ("float dimension", {"shape": [1.5, 64]}, 400, "non-negative integers"),
    ("data not a list", {"data": "abc"}, 400, "'data' must be a list"),
    ("ragged nesting", {"data": [[0.0] * 64, [0.0]]}, 400, "do not match shape"),
    ("nesting past rank 8", {"data": [[[[[[[[[0.0] * 64]]]]]]]]}, 400, "deeper than the rank"),
    ("nested strings", {"data": [["1"] * 64]}, 400, "must be numbers"),
    ("nested nulls", {"data": [[None] * 64]}, 400, "must be numbers"),
    # Integer data is range-checked while decoding, before the model's datatype is looked
    # at; the declared shape fits the model, which is checked first (before any decoding).
    ("INT8 value 300", {"datatype": "INT8", "data": [300] + [0] * 63}, 400, "out of range"),
    ("UINT8 value -1", {"datatype": "UINT8", "data": [-1] + [0] * 63}, 400, "out of range"),
    (
        "INT64 value 2**64-1",
        {"datatype": "INT64", "data": [2**64 - 1] * 64},
        400,
        "out of range",
    ),
    (
        "fraction for INT32",
        {"datatype": "INT32", "data": [1.5] + [0] * 63},
        400,
        "must be integers",
    ),
    ("nested INT8 value 300", {"datatype": "INT8", "data": [[300] + [0] * 63]}, 400, "range"),
]


@pytest.mark.parametrize(
    "data",
    [
        [[0.5] * 64],  # rows as lists
        [[0.5] * 32, [0.5] * 32],  # another regular nesting of the same 64 numbers
        [[0.5] * 63, [0.5]],  # ragged rows: read in row-major order all the same
        [[[0.5] * 8] * 4, [0.5] * 32],
    ],
    ids=["rows", "regular", "ragged", "mixed depth"],
)
def test_nested_data_answers_as_flat_data_does(server: RunningServer, data: list) -> None:
    url = f"{server.url}/v2/models/digits/infer"
    flat = httpx.post(url, json=_infer_body(data=[0.5] * 64), timeout=10)
    nested = httpx.post(url, json=_infer_body(data=data), timeout=10)
    assert flat.status_code == nested.status_code == 200, nested.text
    assert nested.json()["outputs"] == flat.json()["outputs"]


def _assert_error(reply: httpx.Response, status: int, fragment: str) -> None:
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert set(body) == {"error"}
    assert fragment in body["error"]
    assert "Traceback" not in reply.text


@pytest.mark.parametrize(
    ("case", "body", "status", "fragment"), BAD_JSON_REQUESTS, ids=[c[0] for c in BAD_JSON_REQUESTS]
)
def test_malformed_body_is_a_400(
    server: RunningServer, case: str, body: bytes, status: int, fragment: str
) -> None:
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", content=body, timeout=10)
    _assert_error(reply, status, fragment)


@pytest.mark.parametrize(
    ("case", "override", "status", "fragment"), BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS]
)
def test_bad_tensor_gets_its_status(
    server: RunningServer, case: str, override: dict, status: int, fragment: str
) -> None:
    reply = httpx.post(
        f"{server.url}/v2/models/digits/infer", json=_infer_body(**override), timeout=10
    )
    _assert_error(reply, status, fragment)


@pytest.mark.parametrize(
    ("path", "status", "fragment"),
    [
        ("/v2/models/nothing/infer", 404, "unknown model 'nothing'"),
        ("/v2/models/digits/versions/99/infer", 404, "unknown version '99'"),
        ("/v2/models/digits/versions/latest/infer", 404, "unknown version 'latest'"),
    ],
)
def test_unknown_model_or_version_is_a_404(
    server: RunningServer, path: str, status: int, fragment: str
) -> None:
    reply = httpx.post(server.url + path, json=_infer_body(), timeout=10)
    _assert_error(reply, status, fragment)


def test_unknown_output_is_a_400(server: RunningServer) -> None:
    body = {**_infer_body(), "outputs": [{"name": "logits"}]}
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=10)
    _assert_error(reply, 400, "unknown output 'logits'")


def test_binary_header_longer_than_body_is_a_400(server: RunningServer) -> None:
    reply = httpx.post(
        f"{server.url}/v2/models/digits/infer",
        content=b"{}",
        headers={"Inference-Header-Content-Length": "999"},
        timeout=10,
    )
    _assert_error(reply, 400, "larger than the body")


def test_binary_size_that_does_not_match_shape_is_a_400(server: RunningServer) -> None:
    head = (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], '
        b'"parameters": {"binary_data_size": 8}}]}'
    )
    reply = httpx.post(
        f"{server.url}/v2/models/digits/infer",
        content=head + b"\0" * 8,
        headers={"Inference-Header-Content-Length": str(len(head))},
        timeout=10,
    )
    _assert_error(reply, 400, "do not hold shape")


def test_body_over_the_limit_is_a_413_by_header_and_by_stream(server: RunningServer) -> None:
    big = b"x" * (16 * 1024 * 1024 + 1)
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", content=big, timeout=30)
    _assert_error(reply, 413, "exceeds the limit")

    def chunks():
        for _ in range(17):
            yield b"x" * (1024 * 1024)

    reply = httpx.post(f"{server.url}/v2/models/digits/infer", content=chunks(), timeout=30)
    _assert_error(reply, 413, "exceeds the limit")


def test_wrong_method_is_a_405_and_unknown_path_a_404(server: RunningServer) -> None:
    _assert_error(httpx.get(f"{server.url}/v2/models/digits/infer", timeout=10), 405, "method")
    _assert_error(httpx.get(f"{server.url}/v2/nothing", timeout=10), 404, "no such endpoint")


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/x-www-form-urlencoded"},  # what `curl -d @file` sends
        {},  # no Content-Type at all
    ],
    ids=["form", "missing"],
)
@pytest.mark.parametrize("path", ["/v2/models/digits/infer", "/v2/models/digits/versions/2/infer"])
def test_form_or_missing_content_type_is_read_as_json(
    server: RunningServer, headers: dict[str, str], path: str
) -> None:
    row = HELDOUT["X"][0]
    body = _infer_body(data=[float(v) for v in row])
    reply = httpx.post(
        server.url + path, content=json.dumps(body).encode(), headers=headers, timeout=30
    )
    assert reply.status_code == 200, reply.text
    if not headers:
        assert "content-type" not in reply.request.headers  # httpx sent none
    label = next(o for o in reply.json()["outputs"] if o["name"] == "label")
    assert label["data"] == [int(HELDOUT["y"][0])]


def test_server_still_serves_after_the_bad_requests(server: RunningServer) -> None:
    assert _label_of(server, HELDOUT["X"][0]) == int(HELDOUT["y"][0])


def test_model_that_is_loading_answers_503(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from starlette.testclient import TestClient

    from edgeserve.app import build_app
    from edgeserve.config.loader import load_settings
    from edgeserve.runtime import ThreadPlan
    from edgeserve.serving.registry import Registry
    from edgeserve.serving.repository import read_model

    config = tmp_path / "edgeserve.toml"
    config.write_text(f'[models]\nrepository = "{MODELS}"\n[auth]\nenabled = false\n')
    app = build_app(load_settings(config))
    registry = Registry(ThreadPoolExecutor(1), 1, ThreadPlan())
    source = read_model(MODELS / "digits")
    registry.declare("digits", source.config, source.versions)
    app.state.registry = registry
    client = TestClient(app)
    assert client.get("/v2/health/ready").status_code == 503
    assert client.get("/v2/health/live").status_code == 200
    reply = client.post("/v2/models/digits/infer", json=_infer_body())
    assert reply.status_code == 503 and "loading" in reply.json()["error"]
    assert reply.headers["retry-after"] == "1"
