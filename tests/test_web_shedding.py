"""The shedding middleware: a full model answers 429 before routing, auth or the body
read; anything it is not sure about goes on to the endpoint, which answers properly."""

from __future__ import annotations

import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from edgeserve.errors import ModelNotFound
from edgeserve.web.shedding import ShedMiddleware
from tests.serving import run_server


class FakeRegistry:
    def __init__(self) -> None:
        self.full: dict[tuple[str, str | None], bool] = {}

    def get(self, name: str, version: str | None = None) -> SimpleNamespace:
        if (name, version) not in self.full:
            raise ModelNotFound(f"unknown model '{name}'")
        return SimpleNamespace(scheduler=SimpleNamespace(full=self.full[(name, version)]))


@pytest.fixture
def app() -> tuple[TestClient, FakeRegistry, list[str]]:
    reached: list[str] = []

    async def endpoint(request: Request) -> JSONResponse:
        reached.append(request.url.path)
        return JSONResponse({"ok": True})

    routes = [
        Route("/v2/models/{model}/infer", endpoint, methods=["POST", "GET"]),
        Route("/v2/models/{model}/versions/{version}/infer", endpoint, methods=["POST"]),
        Route("/v2/models/{model}/ready", endpoint, methods=["GET"]),
    ]
    starlette = Starlette(routes=routes, middleware=[Middleware(ShedMiddleware)])
    registry = FakeRegistry()
    starlette.state.registry = registry
    return TestClient(starlette), registry, reached


def test_full_model_is_refused_with_429_before_the_endpoint_runs(app) -> None:
    client, registry, reached = app
    registry.full[("digits", None)] = True
    registry.full[("digits", "2")] = True
    for path in ("/v2/models/digits/infer", "/v2/models/digits/versions/2/infer"):
        reply = client.post(path, content=b'{"inputs": []}')
        assert reply.status_code == 429
        assert reply.headers["retry-after"] == "1"
        assert reply.json() == {"error": "the model's queue is full; retry later"}
    assert reached == []


@pytest.mark.parametrize(
    ("method", "path", "full"),
    [
        ("POST", "/v2/models/digits/infer", False),  # room in the queue
        ("POST", "/v2/models/nope/infer", True),  # unknown model: the endpoint's 404
        ("GET", "/v2/models/digits/infer", True),  # not an inference call
        ("GET", "/v2/models/digits/ready", True),  # other endpoints are never shed
    ],
    ids=["not-full", "unknown-model", "get", "other-endpoint"],
)
def test_requests_the_middleware_is_not_sure_about_reach_the_endpoint(
    app, method: str, path: str, full: bool
) -> None:
    client, registry, reached = app
    registry.full[("digits", None)] = full
    reply = client.request(method, path)
    assert reply.status_code == 200
    assert reached == [path]


def _identity_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def _raw_exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request, read one response (head + Content-Length body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def test_uvicorn_refuses_a_full_model_and_keeps_the_connection(tmp_path: Path) -> None:
    """The uvicorn engine's (the default) fast path: 429 with Retry-After, and the same
    keep-alive connection then serves the next request normally."""
    repo = tmp_path / "repo"
    (repo / "held" / "1").mkdir(parents=True)
    (repo / "held" / "1" / "model.onnx").write_bytes(_identity_model())
    # Queued rows wait up to 1 s for a batch of 4: two of them fill the queue meanwhile.
    (repo / "held" / "model.toml").write_text(
        'backend = "onnxruntime"\nmax_batch_size = 4\n[batching]\nmax_queue_delay_ms = 1000\n'
        "max_queue_size = 2\nwait_when_idle = true\n"
    )
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}'
    request = (
        b"POST /v2/models/held/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"X-Request-Timeout-Ms: 100\r\n"  # a probe that got queued leaves at once (504)
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with run_server(tmp_path, "[auth]\nenabled = false\n", repository=repo) as server:
        url = f"{server.url}/v2/models/held/infer"
        with ThreadPoolExecutor(2) as pool:
            held = [pool.submit(httpx.post, url, content=body, timeout=30) for _ in range(2)]
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                reply = b""
                deadline = time.monotonic() + 10
                while not reply.startswith(b"HTTP/1.1 429") and time.monotonic() < deadline:
                    reply = _raw_exchange(sock, request)  # until the queue is full
                assert reply.startswith(b"HTTP/1.1 429"), reply[:200]
                assert b"retry-after: 1" in reply.lower()
                assert b"cache-control: no-store" in reply.lower()  # as every other answer
                assert reply.endswith(b'{"error": "the model\'s queue is full; retry later"}')
                again = _raw_exchange(sock, b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
                assert again.startswith(b"HTTP/1.1 200")
            assert {h.result().status_code for h in held} <= {200, 429}  # none left hanging
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        shed = re.search(
            r'^edgeserve_requests_shed_total\{model="held"\} ([0-9.e+]+)$', metrics, re.M
        )
        assert shed is not None and float(shed.group(1)) >= 1  # shed requests are counted
