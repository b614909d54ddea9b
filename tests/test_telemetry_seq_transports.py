"""Every transport carries the telemetry record id a served or refused inference left,
as HTTP's `x-telemetry-seq` does: gRPC ModelInfer in its trailing metadata, each gRPC
stream answer in its response parameters, each WebSocket answer in its document."""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from websockets.sync.client import connect

from tests.serving import RunningServer, run_server
from tests.test_batching_server import WIDTH, write_repository
from tests.waiting import wait_until

SEQ = "x-telemetry-seq"
TOML = 'backend = "onnxruntime"\nmax_batch_size = 8\n'


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    repo = write_repository(tmp_path_factory.mktemp("repo"), {"linear": TOML})
    folder = tmp_path_factory.mktemp("server")
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{folder / "state"}"\n[models]\nrepository = "{repo}"\n'
        "[auth]\nenabled = false\n[telemetry]\nwrite_interval_ms = 20.0\n"
    )
    with run_server(folder, config_text=config) as server:
        yield server, server.grpc_address()


def _request(request_id: str, name: str = "input") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="linear", id=request_id)
    request.inputs.add(name=name, datatype="FP32", shape=[1, WIDTH])
    request.raw_input_contents.append(np.ones((1, WIDTH), "<f4").tobytes())
    return request


def _stored(server: RunningServer, record_ids: dict[str, str]) -> None:
    """Each id names the record of its request (once the writer has committed it)."""
    assert all(re.fullmatch(r"[0-9a-f]{16}-[1-9][0-9]*", r) for r in record_ids.values())
    db_path = server.config_path.parent / "state" / "telemetry.db"

    def found() -> dict[str, str] | None:
        with sqlite3.connect(db_path) as db:
            rows = dict(db.execute("SELECT record_id, request_id FROM inferences"))
        return rows if set(record_ids.values()) <= set(rows) else None

    rows = wait_until(found, 30, "the records to be committed")
    assert {rows[r]: r for r in record_ids.values()} == record_ids


def test_grpc_model_infer_carries_the_record_id_in_its_trailing_metadata(
    served: tuple[RunningServer, str],
) -> None:
    server, url = served
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        _, call = stub.ModelInfer.with_call(_request("t-ok"), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(_request("t-bad", name="pixels"), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ok = dict(call.trailing_metadata())[SEQ]
    bad = dict(refused.value.trailing_metadata())[SEQ]
    _stored(server, {"t-ok": ok, "t-bad": bad})


def test_each_grpc_stream_answer_carries_its_record_id(served: tuple[RunningServer, str]) -> None:
    server, url = served
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        requests = [_request("s-ok"), _request("s-bad", name="pixels")]
        answers = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert len(answers) == 2 and sum(bool(a.error_message) for a in answers) == 1
    ids = {a.infer_response.id: a.infer_response.parameters[SEQ].string_param for a in answers}
    _stored(server, ids)


def test_each_websocket_answer_carries_its_record_id(served: tuple[RunningServer, str]) -> None:
    server, _ = served
    good = {
        "id": "w-ok",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, WIDTH], "data": [1] * WIDTH}],
    }
    bad = {**good, "id": "w-bad", "inputs": [{**good["inputs"][0], "name": "pixels"}]}
    url = server.url.replace("http://", "ws://") + "/api/stream/linear"
    with connect(url) as ws:
        ws.send(json.dumps(good))
        ws.send(json.dumps(bad))
        answers = [json.loads(ws.recv(timeout=10)) for _ in range(2)]
    assert "outputs" in answers[0] and "error" in answers[1]
    ok = answers[0]["parameters"][SEQ]
    refused = answers[1][SEQ]
    _stored(server, {"w-ok": ok, "w-bad": refused})
