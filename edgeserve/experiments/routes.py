"""HTTP API of experiments and flags (reads need `read`, changes need `admin`)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeserve.auth.guard import requires
from edgeserve.errors import InvalidInput, ModelNotReady
from edgeserve.experiments.service import ExperimentService
from edgeserve.http.body import read_body

MAX_BODY_BYTES = 64 * 1024


def _service(request: Request) -> ExperimentService:
    service = getattr(request.app.state, "experiments", None)
    if service is None:
        raise ModelNotReady("experiments are switched off ([experiments] enabled = false)")
    return service


def _json(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


async def _body(request: Request) -> Any:
    try:
        return orjson.loads(await read_body(request, MAX_BODY_BYTES))
    except orjson.JSONDecodeError:
        raise InvalidInput("request body is not valid JSON") from None


def _subject(request: Request) -> str:
    return request.state.principal.subject


@requires("read")
async def list_experiments(request: Request) -> Response:
    return _json([e.to_json() for e in _service(request).experiments.values()])


@requires("admin")
async def create_experiment(request: Request) -> Response:
    exp = _service(request).create(await _body(request), _subject(request))
    return _json(exp.to_json(), 201)


@requires("read")
async def get_experiment(request: Request) -> Response:
    return _json(_service(request).get(request.path_params["id"]).to_json())


@requires("admin")
async def experiment_action(request: Request) -> Response:
    exp = _service(request).act(
        request.path_params["id"], request.path_params["action"], _subject(request)
    )
    return _json(exp.to_json())


@requires("admin")
async def experiment_weights(request: Request) -> Response:
    body = await _body(request)
    weights = body.get("weights") if isinstance(body, dict) else None
    exp = _service(request).set_weights(request.path_params["id"], weights, _subject(request))
    return _json(exp.to_json())


@requires("read")
async def experiment_report(request: Request) -> Response:
    return _json(await _service(request).report(request.path_params["id"]))


@requires("read")
async def list_flags(request: Request) -> Response:
    return _json(_service(request).flags.to_json())


@requires("admin")
async def put_flag(request: Request) -> Response:
    flag = _service(request).put_flag(
        request.path_params["name"], await _body(request), _subject(request)
    )
    return _json(
        {"name": flag.name, "enabled": flag.enabled, "rollout_percent": flag.rollout_percent}
    )


@requires("read")
async def drift_report(request: Request) -> Response:
    """The latest prediction drift check of every model version."""
    service = _service(request)
    return _json(
        {
            "checks": [c.as_dict() for c in service.drift],
            "psi_threshold": service.settings.drift_psi_threshold,
        }
    )


ROUTES = [
    Route("/api/experiments", list_experiments, methods=["GET"]),
    Route("/api/experiments", create_experiment, methods=["POST"]),
    Route("/api/experiments/{id:str}", get_experiment, methods=["GET"]),
    Route("/api/experiments/{id:str}/report", experiment_report, methods=["GET"]),
    Route("/api/experiments/{id:str}/weights", experiment_weights, methods=["PUT"]),
    Route("/api/experiments/{id:str}/{action:str}", experiment_action, methods=["POST"]),
    Route("/api/drift", drift_report, methods=["GET"]),
    Route("/api/flags", list_flags, methods=["GET"]),
    Route("/api/flags/{name:str}", put_flag, methods=["PUT"]),
]
