"""The data plane's rules that tests/test_transports.py does not state (issue 17), tried
as a client or an attacker would, against a real server on the bundled models (digits
and text): declared shapes are checked before any data is decoded, unknown names cost
one counter and no series, odd version text is never a 500, readiness follows the kill
switch per model, and a client that leaves mid-body is a 499, not a 500.
"""

from __future__ import annotations

import re
import socket
import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.serving import MODELS, RunningServer, run_server
from tests.waiting import wait_until

WAIT_S = 15.0


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, str]]:
    """A server on digits and text with gRPC, auth off; yields (server, grpc target)."""
    folder = tmp_path_factory.mktemp("pipeline")
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{folder / "state"}"\n'
        f'[models]\nrepository = "{MODELS}"\nload = ["digits", "text"]\n'
        "[auth]\nenabled = false\n"
    )
    with run_server(folder, config_text=config) as running:
        yield running, running.grpc_address()


@pytest.fixture(autouse=True)
def models_on(both: tuple[RunningServer, str]) -> Iterator[None]:
    yield
    for model in ("digits", "text"):
        _flag(both[0], model, True)


def _flag(server: RunningServer, model: str, enabled: bool) -> None:
    reply = httpx.put(f"{server.url}/api/flags/model.{model}", json={"enabled": enabled})
    assert reply.status_code == 200, reply.text


def _metrics(server: RunningServer) -> str:
    return httpx.get(f"{server.url}/metrics", timeout=30).text


def _counter(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# -- cheap checks before decoding ------------------------------------------------------


def test_a_declared_batch_over_max_batch_size_is_refused_before_its_data_is_read(
    both: tuple[RunningServer, str],
) -> None:
    """digits takes at most 64 rows: 65 declared rows are refused for their shape, so the
    data (here not even numbers) is never turned into numpy."""
    server, target = both
    tensor = {"name": "input", "datatype": "FP32", "shape": [65, 64], "data": ["x"] * 10}
    reply = httpx.post(f"{server.url}/v2/models/digits/infer", json={"inputs": [tensor]})
    assert reply.status_code == 400
    assert "batch of 65 exceeds max_batch_size 64" in reply.json()["error"]
    request = pb.ModelInferRequest(model_name="digits")
    grpc_tensor = request.inputs.add(name="input", datatype="FP32", shape=[65, 64])
    grpc_tensor.contents.fp32_contents.extend([0.0] * 10)
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds max_batch_size 64" in refused.value.details()


# A declaration the checks passed before, then the same names and shapes with other
# faults: a remembered pass must let none of them through, with the usual error each.
REMEMBERED_DECLARATION_FAULTS = [
    ({"datatype": "INT32", "data": [0] * 64}, "must be FP32, got INT32"),
    ({"shape": [1, 63], "data": [0] * 63}, "has shape [1, 63], model expects [-1, 64]"),
    ({"shape": [0, 64], "data": []}, "has 0 rows"),
    ({"data": [0] * 63}, "63 elements do not match shape [1, 64]"),
    ({"name": "other"}, "unknown input 'other'"),
]


@pytest.mark.parametrize(("change", "error"), REMEMBERED_DECLARATION_FAULTS)
def test_a_remembered_pass_of_the_checks_lets_no_other_fault_through(
    both: tuple[RunningServer, str], change: dict, error: str
) -> None:
    server, _ = both
    good = {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}
    url = f"{server.url}/v2/models/digits/infer"
    for _ in range(2):  # the second time from the remembered pass
        assert httpx.post(url, json={"inputs": [good]}).status_code == 200
        reply = httpx.post(url, json={"inputs": [{**good, **change}]})
        assert reply.status_code == 400
        assert error in reply.json()["error"]


# -- unknown names ---------------------------------------------------------------------


def test_two_thousand_made_up_names_cost_one_counter_and_no_series(
    both: tuple[RunningServer, str],
) -> None:
    server, _ = both
    before = _metrics(server)
    tag = uuid.uuid4().hex[:8]
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for i in range(2000):
            reply = client.post(f"/v2/models/made-up-{tag}-{i}/infer", json=body)
            assert reply.status_code == 404
    after = _metrics(server)
    assert len(after) - len(before) < 64 * 1024
    assert f"made-up-{tag}" not in after
    grown = _counter(after, "edgeserve_unknown_model_requests_total") - _counter(
        before, "edgeserve_unknown_model_requests_total"
    )
    assert grown == 2000


ODD_VERSIONS = ["²", "٣", "1e3", "-1", "01x", "1" * 19, "+1", " 1"]


@pytest.mark.parametrize("version", ODD_VERSIONS)
def test_odd_version_text_is_a_404_never_a_500(
    both: tuple[RunningServer, str], version: str
) -> None:
    server, target = both
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}
    base = f"{server.url}/v2/models/digits/versions/{version}"
    assert httpx.post(base + "/infer", json=body).status_code in (400, 404)
    assert httpx.get(base + "/ready").status_code in (400, 404)
    request = pb.ModelInferRequest(model_name="digits", model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(bytes(256))
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert refused.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


# -- readiness per model ---------------------------------------------------------------


def test_one_killed_model_is_not_ready_but_the_server_stays_ready(
    both: tuple[RunningServer, str],
) -> None:
    server, _ = both
    _flag(server, "text", False)
    assert httpx.get(f"{server.url}/v2/models/text/ready").status_code == 503
    assert httpx.get(f"{server.url}/v2/models/digits/ready").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    _flag(server, "digits", False)
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 503
    _flag(server, "text", True)
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


# -- disconnects -----------------------------------------------------------------------


def test_a_client_gone_mid_body_is_counted_as_499(both: tuple[RunningServer, str]) -> None:
    server, _ = both
    line = re.compile(r'^edgeserve_requests_total\{[^}]*model="digits"[^}]*status="(\d+)"')
    head = (
        "POST /v2/models/digits/infer HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        "content-type: application/json\r\ncontent-length: 100000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"inputs": [')

    def statuses_with_499() -> set[str] | None:
        statuses = {m.group(1) for m in map(line.match, _metrics(server).splitlines()) if m}
        return statuses if "499" in statuses else None

    statuses = wait_until(statuses_with_499, WAIT_S, "a request counted as 499", interval_s=0)
    assert "499" in statuses and "500" not in statuses, statuses
    assert "Traceback" not in server.log() and "ERROR" not in server.log()
