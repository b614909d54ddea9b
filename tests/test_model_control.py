"""Triton's explicit model control, as tritonclient's `load_model`/`unload_model` use it
over HTTP and gRPC: admin scope, the server stays ready while a model is unloaded, and
broken requests get their status."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from edgeserve.auth import issuer
from tests.serving import MODELS, RunningServer, run_server

pytestmark = pytest.mark.slow


@dataclass
class Served:
    server: RunningServer
    grpc_url: str
    repo: Path
    admin: dict[str, str]  # scopes admin and read (admin does not imply read)
    infer: dict[str, str]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("control")
    state_dir = folder / "state"
    issuer.init_keys(state_dir)
    repo = folder / "repo"
    shutil.copytree(MODELS / "digits", repo / "digits")
    config = (
        f'[server]\nhost = "127.0.0.1"\nport = {{port}}\ngrpc_port = "auto"\n'
        f'state_dir = "{state_dir}"\n[models]\nrepository = "{repo}"\n'
        "[auth]\nfailed_auth_burst = 0\n"
    )

    def bearer(*scopes: str) -> dict[str, str]:
        token = issuer.create_token(state_dir, scopes, 600, "it", "edgeserve-local", "edgeserve")
        return {"authorization": f"Bearer {token}"}

    with run_server(folder, config_text=config) as server:
        admin, infer = bearer("admin", "read"), bearer("infer")
        yield Served(server, server.grpc_address(), repo, admin, infer)


@pytest.fixture(autouse=True)
def digits_loaded_after(served: Served) -> Iterator[None]:
    """Each test starts with digits served, whatever the one before left."""
    yield
    url = f"{served.server.url}/v2/repository/models/digits/load"
    httpx.post(url, headers=served.admin, timeout=60)


def http_client(served: Served) -> thttp.InferenceServerClient:
    return thttp.InferenceServerClient(f"127.0.0.1:{served.server.port}")


def infer_status(served: Served) -> int:
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}
    url = f"{served.server.url}/v2/models/digits/infer"
    return httpx.post(url, json=doc, headers=served.infer, timeout=30).status_code


def server_ready(served: Served) -> bool:
    return httpx.get(f"{served.server.url}/v2/health/ready", timeout=10).status_code == 200


def index(served: Served) -> list[dict]:
    url = f"{served.server.url}/v2/repository/index"
    return httpx.post(url, headers=served.admin, timeout=10).json()


def test_http_unload_then_load_with_tritonclient(served: Served) -> None:
    with http_client(served) as client:
        client.unload_model("digits", headers=served.admin)
        assert not client.is_model_ready("digits", headers=served.admin)
        assert server_ready(served)  # an unloaded model is out of readiness, as in Triton
        assert {(e["state"], e.get("reason")) for e in index(served)} == {
            ("UNAVAILABLE", "unloaded")
        }
        assert infer_status(served) == 503
        client.load_model("digits", headers=served.admin)
        assert client.is_model_ready("digits", headers=served.admin)
    assert infer_status(served) == 200
    assert {e["state"] for e in index(served)} == {"READY"}


def test_grpc_unload_then_load_with_tritonclient(served: Served) -> None:
    with tgrpc.InferenceServerClient(served.grpc_url) as client:
        client.unload_model("digits", headers=served.admin)
        assert not client.is_model_ready("digits", headers=served.admin)
        assert client.is_server_ready()
        client.load_model("digits", headers=served.admin)
        assert client.is_model_ready("digits", headers=served.admin)
        data = tgrpc.InferInput("input", [2, 64], "FP32")
        data.set_data_from_numpy(np.zeros((2, 64), np.float32))
        result = client.infer("digits", [data], headers=served.infer)
        assert result.as_numpy("label").shape == (2,)


@pytest.mark.parametrize("action", ["load", "unload"])
def test_model_control_needs_the_admin_scope(served: Served, action: str) -> None:
    url = f"{served.server.url}/v2/repository/models/digits/{action}"
    assert httpx.post(url, timeout=10).status_code == 401
    assert httpx.post(url, headers=served.infer, timeout=10).status_code == 403
    with tgrpc.InferenceServerClient(served.grpc_url) as client:
        call = client.load_model if action == "load" else client.unload_model
        with pytest.raises(InferenceServerException) as refused:
            call("digits", headers=served.infer)
        assert refused.value.status() == "StatusCode.PERMISSION_DENIED"
    assert infer_status(served) == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "says"),
    [
        ("nosuch/load", b"", 404, "nosuch"),
        ("nosuch/unload", b"", 404, "nosuch"),
        ("..%2Fetc/load", b"", 404, ""),
        ("digits/load", b"{not json", 400, "JSON"),
        ("digits/load", b"[]", 400, "object"),
        ("digits/load", b'{"parameters": "x"}', 400, "parameters"),
        ("digits/load", b'{"parameters": {"config": "{}"}}', 400, "config"),
        ("digits/load", b'{"parameters": {"file:1/model.onnx": "AAAA"}}', 400, "file:"),
        ("digits/load", b'{"parameters": {"bogus": 1}}', 400, "bogus"),
        ("digits/unload", b'{"parameters": {"unload_dependents": "yes"}}', 400, "unload_dep"),
        ("digits/unload", b'{"parameters": {"bogus": true}}', 400, "bogus"),
        ("digits/load", b"x" * (65 * 1024), 413, ""),
    ],
    ids=[
        "load-unknown",
        "unload-unknown",
        "traversal",
        "not-json",
        "not-object",
        "parameters-not-object",
        "config-override",
        "file-override",
        "unknown-load-parameter",
        "unload-dependents-not-bool",
        "unknown-unload-parameter",
        "body-too-large",
    ],
)
def test_broken_model_control_requests_get_their_status(
    served: Served, path: str, body: bytes, status: int, says: str
) -> None:
    url = f"{served.server.url}/v2/repository/models/{path}"
    answer = httpx.post(url, content=body, headers=served.admin, timeout=10)
    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]
    assert infer_status(served) == 200  # nothing was unloaded on the way


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"model_name": "nosuch"}, "StatusCode.NOT_FOUND"),
        ({"model_name": "digits", "config": "{}"}, "StatusCode.INVALID_ARGUMENT"),
    ],
    ids=["unknown", "config-override"],
)
def test_grpc_broken_load_gets_its_code(served: Served, kwargs: dict, status: str) -> None:
    with (
        tgrpc.InferenceServerClient(served.grpc_url) as client,
        pytest.raises(InferenceServerException) as refused,
    ):
        client.load_model(**kwargs, headers=served.admin)
    assert refused.value.status() == status


def test_grpc_other_repository_is_invalid(served: Served) -> None:
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(served.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.RepositoryModelLoadRequest(repository_name="other", model_name="digits")
        with pytest.raises(grpc.RpcError) as refused:
            stub.RepositoryModelLoad(request, metadata=tuple(served.admin.items()))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "repository_name" in (refused.value.details() or "")


def test_load_of_a_broken_file_says_why_and_the_old_version_keeps_serving(
    served: Served,
) -> None:
    model = served.repo / "digits" / "2" / "model.onnx"
    good = model.read_bytes()
    xml, xml_bin = (
        served.repo / "digits" / "2" / "model.xml",
        served.repo / "digits" / "2" / "model.bin",
    )
    moved = [(p, p.read_bytes()) for p in (xml, xml_bin)]
    try:
        for path, _ in moved:
            path.unlink()
        model.write_bytes(b"not an onnx model")
        with http_client(served) as client, pytest.raises(InferenceServerException) as refused:
            client.load_model("digits", headers=served.admin)
        assert "failed to load" in str(refused.value) and "version 2" in str(refused.value)
        assert infer_status(served) == 200
    finally:
        model.write_bytes(good)
        for path, data in moved:
            path.write_bytes(data)


def test_failed_load_of_an_unloaded_model_leaves_the_server_ready(served: Served) -> None:
    """Triton's rule: the model reports its failure; the server stays in its load balancer
    (here digits is the only model: unready would mean a dead box, not a broken model)."""
    files = [p for p in (served.repo / "digits").glob("*/model.*") if p.is_file()]
    kept = {p: p.read_bytes() for p in files}
    try:
        with http_client(served) as client:
            client.unload_model("digits", headers=served.admin)
            for path in files:
                path.write_bytes(b"not a model")
            with pytest.raises(InferenceServerException) as refused:
                client.load_model("digits", headers=served.admin)
            assert "failed to load" in str(refused.value), refused.value
            assert not client.is_model_ready("digits", headers=served.admin)
        assert server_ready(served)
        assert infer_status(served) == 503
    finally:
        for path, data in kept.items():
            path.write_bytes(data)
    with http_client(served) as client:
        client.load_model("digits", headers=served.admin)
    assert server_ready(served) and infer_status(served) == 200
