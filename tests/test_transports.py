"""The same behaviour over every way in (issue 17): REST JSON, REST binary, gRPC unary,
the gRPC stream and the WebSocket, against one real server with HTTP and gRPC.

Each test states one rule of the data plane (briefs/contract.md) and runs it over the
five transports through the adapters in tests/transports.py. Server state (the
`model.digits` flag, experiments) is reset through the HTTP API before each test.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.disconnects import DISCONNECTS
from tests.transport_server import (
    TransportServer,
    settled_rows,
    telemetry_rows,
    transport_server,
    wait_durable,
)
from tests.transports import TRANSPORTS, Transport, clients, digits_request


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransportServer]:
    with transport_server(tmp_path_factory.mktemp("transports")) as server:
        yield server


@pytest.fixture(scope="module")
def adapters(served: TransportServer) -> Iterator[dict[str, Transport]]:
    with clients(served.url, served.grpc_target) as by_name:
        yield by_name


@pytest.fixture(autouse=True)
def clean_state(served: TransportServer) -> None:
    """digits switched on, no experiment active: what every test starts from."""
    with httpx.Client(base_url=served.url, timeout=10) as api:
        assert api.put("/api/flags/model.digits", json={"enabled": True}).status_code == 200
        for exp in api.get("/api/experiments").json():
            if exp["status"] == "active":
                assert api.post(f"/api/experiments/{exp['id']}/stop").status_code == 200


def _switch_digits(served: TransportServer, enabled: bool) -> None:
    reply = httpx.put(f"{served.url}/api/flags/model.digits", json={"enabled": enabled})
    assert reply.status_code == 200, reply.text


# -- kill switch ---------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_killed_model_answers_503_on_every_address(
    served: TransportServer, adapters: dict[str, Transport], transport: str
) -> None:
    """`model.digits` off refuses every way of naming it (issue 17: `/versions/1` went
    on answering 200); a WebSocket still opens and refuses each message."""
    client = adapters[transport]
    _switch_digits(served, False)
    for version in (None, "1", "2"):
        outcome = client.infer("digits", version, digits_request(id="killed"))
        assert outcome.status == 503, (version, outcome)
        assert "switched off" in outcome.error, (version, outcome)
    _switch_digits(served, True)
    for version in (None, "1", "2"):
        outcome = client.infer("digits", version, digits_request())
        assert outcome.status == 200, (version, outcome)


def _grpc_ready(served: TransportServer) -> tuple[bool, bool, bool]:
    """(ServerReady, ModelReady digits, ModelReady digits 1) over gRPC."""
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        server = stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        model = stub.ModelReady(pb.ModelReadyRequest(name="digits"), timeout=10).ready
        one = stub.ModelReady(pb.ModelReadyRequest(name="digits", version="1"), timeout=10).ready
    return server, model, one


def _rest_ready(served: TransportServer) -> dict[str, tuple[int, object]]:
    paths = ("/v2/health/ready", "/v2/models/digits/ready", "/v2/models/digits/versions/1/ready")
    replies = {p: httpx.get(served.url + p) for p in paths}
    return {p: (r.status_code, r.json().get("ready")) for p, r in replies.items()}


def test_a_killed_model_is_not_ready_and_comes_back(served: TransportServer) -> None:
    """digits is this server's only model: killing it takes the box out of rotation
    (REST and gRPC readiness alike) until the flag is switched on again."""
    _switch_digits(served, False)
    assert _rest_ready(served) == {
        "/v2/health/ready": (503, False),
        "/v2/models/digits/ready": (503, False),
        "/v2/models/digits/versions/1/ready": (503, False),
    }
    assert _grpc_ready(served) == (False, False, False)
    _switch_digits(served, True)
    assert set(_rest_ready(served).values()) == {(200, True)}
    assert _grpc_ready(served) == (True, True, True)


def test_killing_one_model_leaves_the_box_ready_while_another_serves(
    tmp_path: Path,
) -> None:
    """A kill switch must not take the whole box out of its load balancer."""
    with transport_server(tmp_path, models=("digits", "text")) as other:
        _switch_digits(other, False)
        assert httpx.get(f"{other.url}/v2/health/ready").status_code == 200
        assert httpx.get(f"{other.url}/v2/models/digits/ready").status_code == 503
        assert httpx.get(f"{other.url}/v2/models/text/ready").status_code == 200
        assert _grpc_ready(other) == (True, False, False)


# -- unknown names -------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_unknown_model_is_404_and_makes_no_metric_series(
    served: TransportServer, adapters: dict[str, Transport], transport: str
) -> None:
    """Client text never becomes a label: an unknown model, or an unknown version of a
    known one, is refused without a metric series of its own."""
    client = adapters[transport]
    made_up = f"nope-{uuid.uuid4().hex[:12]}"
    unknown_version = str(10**9 + uuid.uuid4().int % 10**9)  # digits has 1 and 2
    for model, version in ((made_up, None), (made_up, "1"), ("digits", unknown_version)):
        outcome = client.infer(model, version, digits_request(id=f"{made_up}-{version}"))
        if transport == "websocket":  # refused before accept, as a model it cannot serve
            assert outcome.refused_handshake, (model, version, outcome)
        else:
            assert outcome.status == 404, (model, version, outcome)
    metrics = httpx.get(f"{served.url}/metrics").text  # the writer catches up first
    assert made_up not in metrics
    assert f'version="{unknown_version}"' not in metrics


# -- experiments ---------------------------------------------------------------------


def _start_split(served: TransportServer, exp_id: str) -> None:
    doc = {
        "id": exp_id,
        "model": "digits",
        "unit": "header:x-user-id",
        "variants": [
            {"name": "control", "version": 1, "weight": 50},
            {"name": "candidate", "version": 2, "weight": 50},
        ],
    }
    reply = httpx.post(f"{served.url}/api/experiments", json=doc)
    assert reply.status_code == 201, reply.text


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_experiment_routing_is_sticky_and_the_same_over_every_transport(
    served: TransportServer, adapters: dict[str, Transport], transport: str
) -> None:
    """The same user gets the same version whichever way they come in, every time
    (gRPC metadata and the WebSocket handshake carry `x-user-id` like a REST header)."""
    exp_id = f"split-{transport}"
    _start_split(served, exp_id)
    users = [f"user-{i}" for i in range(24)]
    reference: dict[str, str | None] = {}
    for user in users:  # REST JSON, the transport that routes on the base commit too
        outcome = adapters["rest-json"].infer("digits", None, digits_request(), {"x-user-id": user})
        assert outcome.status == 200, outcome
        variant = "control" if outcome.model_version == "1" else "candidate"
        assert outcome.headers["x-edgeserve-variant"] == f"{exp_id}/{variant}"
        reference[user] = outcome.model_version
    assert set(reference.values()) == {"1", "2"}, "24 users all landed on one side"
    client = adapters[transport]
    for _ in range(2):
        served_versions = {
            user: client.infer("digits", None, digits_request(), {"x-user-id": user})
            for user in users
        }
        assert {u: o.status for u, o in served_versions.items()} == dict.fromkeys(users, 200)
        assert {u: o.model_version for u, o in served_versions.items()} == reference
        if transport.startswith("rest"):
            variants = {o.headers.get("x-edgeserve-variant") for o in served_versions.values()}
            assert variants == {f"{exp_id}/control", f"{exp_id}/candidate"}
    for user, version in reference.items():  # a named version is served as named
        named = "2" if version == "1" else "1"
        outcome = client.infer("digits", named, digits_request(), {"x-user-id": user})
        assert (outcome.status, outcome.model_version) == (200, named), (user, outcome)


# -- deadlines -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_an_expired_deadline_is_504(adapters: dict[str, Transport], transport: str) -> None:
    """Triton's `timeout` parameter is in microseconds: 1 µs has passed before the batcher."""
    doc = digits_request(id="late", parameters={"timeout": 1})
    for version in (None, "1"):
        outcome = adapters[transport].infer("digits", version, doc)
        assert outcome.status == 504, (version, outcome)


# -- bounded ids -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_million_character_id_is_served_and_stored_truncated(
    served: TransportServer, adapters: dict[str, Transport], transport: str
) -> None:
    """Every stored id has a bound (issue 17: 650 one-megabyte WebSocket ids evicted every
    real row through the size cap), yet the client gets its own id back."""
    prefix = f"big-{transport}-{uuid.uuid4().hex[:8]}-"
    long_id = prefix + "x" * (1_000_000 - len(prefix))
    outcome = adapters[transport].infer("digits", None, digits_request(id=long_id))
    assert outcome.status == 200, outcome.error[:300]
    assert outcome.doc["id"] == long_id  # echoed unchanged, as Triton does
    if transport.startswith("rest"):
        assert outcome.headers["x-request-id"] == long_id[:128]
    wait_durable(served)
    rows = telemetry_rows(
        served,
        "SELECT length(request_id), status FROM inferences WHERE request_id LIKE ?",
        prefix + "%",
    )
    assert rows == [(128, 200)]
    rows = telemetry_rows(
        served, "SELECT count(*) FROM inferences WHERE request_id = ?", long_id[:128]
    )
    assert rows == [(1,)]


# -- disconnects -----------------------------------------------------------------------


def _counted_500s(served: TransportServer) -> float:
    """Requests counted as 500 in /metrics, over every series."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{served.url}/metrics").text.splitlines()
        if line.startswith("edgeserve_requests_total{") and 'status="500"' in line
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_client_that_disconnects_is_not_an_error(served: TransportServer, transport: str) -> None:
    """Recorded as 499 (or not at all), never 500, and nothing logged as an error."""
    prefix = f"gone-{transport}-{uuid.uuid4().hex[:8]}-"
    log_start = len(served.log())
    errors_before = _counted_500s(served)
    sent = DISCONNECTS[transport](served, prefix)
    rows = settled_rows(
        served, "SELECT request_id, status FROM inferences WHERE request_id LIKE ?", prefix + "%"
    )
    assert len(rows) <= sent
    assert {status for _, status in rows} <= {200, 499}, rows
    logged = served.log()[log_start:]
    assert "ERROR" not in logged and "Traceback" not in logged, logged[-3000:]
    # no false error rate for alerts and health-watch rollbacks
    assert _counted_500s(served) == errors_before
