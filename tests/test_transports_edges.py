"""Edges of the data plane found in review, each reproduced through the real server:
request ids that are not header text, streams whose messages share one connection's
headers, a killed model's body, and a header integer that is not ASCII digits."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from websockets.sync.client import connect

from tests.transport_server import (
    TransportServer,
    telemetry_rows,
    transport_server,
    wait_durable,
)
from tests.transports import digits_request

INFER = "/v2/models/digits/infer"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransportServer]:
    with transport_server(tmp_path_factory.mktemp("edges")) as server:
        yield server


@pytest.mark.parametrize("odd_id", ["中文-id", "line\r\nbreak", "nul\x00", "tab\there", "é"])
def test_an_id_that_is_not_header_text_is_served_not_a_500(
    served: TransportServer, odd_id: str
) -> None:
    """The id is echoed in the body and stored, and x-request-id carries a safe form of
    it (Starlette raised UnicodeEncodeError on '中': a 500 after a recorded 200)."""
    reply = httpx.post(served.url + INFER, json=digits_request(id=odd_id), timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["id"] == odd_id
    header = reply.headers["x-request-id"]
    assert header.isascii() and header.isprintable()
    wait_durable(served)
    rows = telemetry_rows(served, "SELECT status FROM inferences WHERE request_id = ?", odd_id)
    assert rows == [(200,)]
    assert "Traceback" not in served.log()


def _rows_named(served: TransportServer, request_id: str) -> int:
    wait_durable(served)
    sql = "SELECT count(*) FROM inferences WHERE request_id = ?"
    return telemetry_rows(served, sql, request_id)[0][0]


def _count(served: TransportServer) -> int:
    wait_durable(served)
    return telemetry_rows(served, "SELECT count(*) FROM inferences")[0][0]


def test_websocket_messages_do_not_share_the_handshakes_request_id(
    served: TransportServer,
) -> None:
    """x-request-id on the handshake names the connection, not each message in it."""
    connection_id = f"ws-{uuid.uuid4().hex}"
    before = _count(served)
    url = served.url.replace("http://", "ws://") + "/api/stream/digits"
    with connect(url, additional_headers={"x-request-id": connection_id}) as ws:
        for _ in range(3):
            ws.send(json.dumps(digits_request()))
            assert "outputs" in json.loads(ws.recv(timeout=30))
    assert _count(served) >= before + 3 + 1  # the three, and wait_durable's own
    assert _rows_named(served, connection_id) == 0


def test_grpc_stream_requests_do_not_share_the_calls_request_id(served: TransportServer) -> None:
    connection_id = f"stream-{uuid.uuid4().hex}"
    before = _count(served)
    request = pb.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    tensor.contents.fp32_contents.extend(digits_request()["inputs"][0]["data"][0])
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        replies = stub.ModelStreamInfer(
            iter([request] * 3), metadata=[("x-request-id", connection_id)], timeout=60
        )
        assert [r.error_message for r in replies] == ["", "", ""]
    assert _count(served) >= before + 3 + 1
    assert _rows_named(served, connection_id) == 0


def test_a_killed_model_refuses_before_reading_the_body(served: TransportServer) -> None:
    """The kill switch spares the server the body: a broken one still answers 503."""
    with httpx.Client(base_url=served.url, timeout=30) as api:
        assert api.put("/api/flags/model.digits", json={"enabled": False}).status_code == 200
        try:
            reply = api.post(INFER, content=b"{not json", headers={"content-type": JSON_TYPE})
        finally:
            assert api.put("/api/flags/model.digits", json={"enabled": True}).status_code == 200
    assert reply.status_code == 503, reply.text
    assert "switched off" in reply.json()["error"]


JSON_TYPE = "application/json"


@pytest.mark.parametrize("value", ["٣", "1e3", "1_0", "5.5", "-1", "9" * 19])
def test_a_timeout_header_is_ascii_digits(served: TransportServer, value: str) -> None:
    reply = httpx.post(
        served.url + INFER,
        json=digits_request(),
        headers={"x-request-timeout-ms": value.encode()},  # as a client may send it
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    assert "X-Request-Timeout-Ms" in reply.json()["error"]
