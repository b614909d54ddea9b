"""Issue 17's abuse cases as regression tests, tried as an attacker would through the real
server: made-up model names by the thousand, odd integer text, and a huge request
whose declared batch is already too big.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.transport_server import (
    TransportServer,
    telemetry_rows,
    transport_server,
    wait_durable,
)
from tests.transports import (
    GRPC_STATUS,
    Outcome,
    WebSocketStream,
    digits_request,
    post,
    retrying,
)

UNKNOWN_COUNTER = "edgeserve_unknown_model_requests_total"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransportServer]:
    """Auth off (loopback)."""
    with transport_server(tmp_path_factory.mktemp("abuse-open")) as server:
        yield server


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransportServer]:
    """Auth on, as shipped; the tests here send no token."""
    with transport_server(tmp_path_factory.mktemp("abuse-locked"), auth=True) as server:
        yield server


def _counter(metrics: str, name: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{}"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_two_thousand_made_up_names_leave_metrics_and_telemetry_bounded(
    open_server: TransportServer,
) -> None:
    """Issue 17 measured /metrics growing from 18 KB to 792 MB on this loop."""
    token = uuid.uuid4().hex[:10]
    body = json.dumps(digits_request()).encode()
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        before = client.get("/metrics").text
        statuses = {
            client.post(
                f"/v2/models/made-up-{token}-{i}/infer",
                content=body,
                headers={"content-type": "application/json"},
            ).status_code
            for i in range(2000)
        }
        after = client.get("/metrics").text
    assert statuses == {404}
    assert len(after.encode()) - len(before.encode()) < 64 * 1024
    assert token not in after
    counted = _counter(after, UNKNOWN_COUNTER)
    assert counted is not None, f"no {UNKNOWN_COUNTER} in /metrics"
    assert counted - (_counter(before, UNKNOWN_COUNTER) or 0.0) == 2000
    wait_durable(open_server)
    rows = telemetry_rows(
        open_server, "SELECT count(*) FROM inferences WHERE model LIKE ?", f"made-up-{token}%"
    )
    assert rows == [(0,)]


# `²` and `٣` pass str.isdigit() and then fail int(); the rest are plain wrong or too long.
ODD_VERSIONS = ["²", "٣", "1e3", "1234567890123456789", "-1", "01x", " 1", "999999999999999999"]


def _rest_statuses(server: TransportServer, version: str) -> dict[str, int]:
    base = f"/v2/models/digits/versions/{quote(version, safe='')}"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        return {
            "infer": client.post(base + "/infer", json=digits_request()).status_code,
            "metadata": client.get(base).status_code,
            "ready": client.get(base + "/ready").status_code,
            "config": client.get(base + "/config").status_code,
            "stats": client.get(base + "/stats").status_code,
        }


def _grpc_statuses(server: TransportServer, version: str) -> dict[str, int]:
    request = pb.ModelInferRequest(model_name="digits", model_version=version, id="odd")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.zeros(64, np.float32).tobytes())
    calls = {
        "grpc infer": lambda stub: stub.ModelInfer(request, timeout=30),
        "grpc ready": lambda stub: stub.ModelReady(
            pb.ModelReadyRequest(name="digits", version=version), timeout=30
        ),
        "grpc metadata": lambda stub: stub.ModelMetadata(
            pb.ModelMetadataRequest(name="digits", version=version), timeout=30
        ),
    }
    statuses = {}
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for name, call in calls.items():
            try:
                reply = call(stub)
            except grpc.RpcError as error:
                statuses[name] = GRPC_STATUS.get(error.code(), 500)  # type: ignore[attr-defined]
            else:  # only ModelReady may answer: not ready is an answer too
                statuses[name] = 404 if getattr(reply, "ready", True) is False else 200
    return statuses


@pytest.mark.parametrize("version", ODD_VERSIONS)
@pytest.mark.parametrize("server_name", ["open_server", "locked_server"])
def test_an_odd_version_is_refused_never_500(
    request: pytest.FixtureRequest, server_name: str, version: str
) -> None:
    """400 or 404 (401 without a token when auth is on: either order is fine), never 500."""
    server: TransportServer = request.getfixturevalue(server_name)
    allowed = {400, 404} if server_name == "open_server" else {400, 401, 404}
    log_start = len(server.log())
    statuses = {**_rest_statuses(server, version), **_grpc_statuses(server, version)}
    assert {k: v for k, v in statuses.items() if v not in allowed} == {}, statuses
    ws = WebSocketStream(server.url).infer("digits", version, digits_request())
    assert ws.refused_handshake and ws.status != 500, ws  # refused before accept, as today
    assert "Traceback" not in server.log()[log_start:]


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v2/models/digits/infer", {"inference-header-content-length": "²"}),
        ("/v2/models/digits/infer", {"inference-header-content-length": "1" * 19}),
        ("/v2/models/digits/infer", {"x-request-timeout-ms": "²"}),
        ("/api/audit?limit=²", {}),
        ("/api/audit?since=²", {}),
    ],
    ids=["header-length-superscript", "header-length-19-digits", "timeout-ms", "limit", "since"],
)
def test_odd_integers_in_headers_and_queries_are_refused_never_500(
    open_server: TransportServer, path: str, headers: dict[str, str]
) -> None:
    """The same class of bug as the version: every integer a client sends goes through
    one strict parser."""
    with httpx.Client(base_url=open_server.url, timeout=30) as client:
        if path.startswith("/v2"):
            body = json.dumps(digits_request()).encode()
            # latin-1, as HTTP carries header bytes: the server reads back exactly this text
            raw = {k: v.encode("latin-1") for k, v in headers.items()}
            reply = post(client, path, content=body, headers=raw)
        else:
            reply = client.get(path, headers=headers)
    assert reply.status_code in {400, 404}, (reply.status_code, reply.text[:200])


# -- cheap checks before decoding --------------------------------------------------------

BIG_BATCH = 20_000  # rows declared; digits' max_batch_size is 64


def _huge_json_body(last: str) -> bytes:
    """A ~2.6 MB V2 request declaring [20000, 64]; its last element is `last`."""
    count = BIG_BATCH * 64
    data = "0," * (count - 1) + last
    tensor = (
        f'{{"name": "input", "datatype": "FP32", "shape": [{BIG_BATCH}, 64], "data": [{data}]}}'
    )
    return f'{{"inputs": [{tensor}]}}'.encode()


@pytest.mark.parametrize("last", ["0", '"not a number"'], ids=["numbers", "bad-last-element"])
def test_a_declared_batch_over_max_is_refused_before_its_data_is_decoded_rest(
    open_server: TransportServer, last: str
) -> None:
    """With a bad last element the answer shows the order: refused for its declared
    batch, so its data was never converted (the base commit converts first)."""
    with httpx.Client(timeout=60) as client:
        reply = post(
            client,
            f"{open_server.url}/v2/models/digits/infer",
            content=_huge_json_body(last),
            headers={"content-type": "application/json"},
        )
    assert reply.status_code == 400, reply.text[:300]
    assert "max_batch_size" in reply.json()["error"]


def test_a_declared_batch_over_max_is_refused_400_grpc(open_server: TransportServer) -> None:
    request = pb.ModelInferRequest(model_name="digits", id="huge")
    request.inputs.add(name="input", datatype="FP32", shape=[BIG_BATCH, 64])
    request.raw_input_contents.append(np.zeros((BIG_BATCH, 64), np.float32).tobytes())
    with grpc.insecure_channel(open_server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def send() -> Outcome:
            try:
                stub.ModelInfer(request, timeout=60)
            except grpc.RpcError as error:
                code, details = error.code(), error.details()  # type: ignore[attr-defined]
                return Outcome(GRPC_STATUS.get(code, 500), {"error": details})
            return Outcome(200, {})

        outcome = retrying(send)
    assert outcome.status == 400, outcome
    assert "max_batch_size" in outcome.error
