"""The shedding middleware: a full model answers 429 before routing, auth or the body
read; anything it is not sure about goes on to the endpoint, which answers properly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from edgeserve.errors import ModelNotFound
from edgeserve.web.shedding import ShedMiddleware


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
