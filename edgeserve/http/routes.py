"""Open Inference Protocol (KServe V2) REST endpoints, plus Triton's statistics,
repository and explicit model control extensions so that `tritonclient.http` works
unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from types import MappingProxyType
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeserve.auth.guard import authorize, requires
from edgeserve.errors import InvalidInput, UnsupportedMediaType
from edgeserve.http.answers import JSON as JSON_TYPE
from edgeserve.http.answers import OCTETS, RestAnswer, to_response
from edgeserve.http.body import read_body, read_json_object
from edgeserve.http.errors import answer_error
from edgeserve.http.headers import TELEMETRY_SEQ, header_text
from edgeserve.protocol.codec import HEADER_LENGTH, decode_request, encode_response
from edgeserve.protocol.integers import parse_uint
from edgeserve.protocol.types import InferOutput, InferRequest, InferResponse
from edgeserve.serving import documents, model_control
from edgeserve.serving.pipeline import DataPlane, Served
from edgeserve.serving.registry import Registry

JSON = "application/json"


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON, headers=headers)


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _pipeline(request: Request) -> DataPlane:
    return request.app.state.pipeline


async def server_live(request: Request) -> Response:
    return json_response({"live": True})


async def server_ready(request: Request) -> Response:
    reason = _pipeline(request).unready_reason()
    if reason is not None:
        return json_response({"ready": False, "error": reason}, 503)
    return json_response({"ready": True})


@requires("read")
async def server_metadata(request: Request) -> Response:
    return json_response(documents.server_metadata())


def _version_param(request: Request) -> str | None:
    return request.path_params.get("version")


@requires("read")
async def model_metadata(request: Request) -> Response:
    return json_response(
        documents.model_metadata(
            _registry(request), request.path_params["model"], _version_param(request)
        )
    )


@requires("read")
async def model_ready(request: Request) -> Response:
    name = request.path_params["model"]
    if not _pipeline(request).model_ready(name, _version_param(request)):
        return json_response({"name": name, "ready": False}, 503)
    return json_response({"name": name, "ready": True})


@requires("read")
async def model_config(request: Request) -> Response:
    """Triton's model configuration, for clients that ask for it."""
    model = _registry(request).get(request.path_params["model"], _version_param(request))
    return json_response(documents.model_config(model))


async def infer(request: Request) -> Response:
    """POST .../infer as a Starlette endpoint (the ordinary way: CORS configured, a body
    still arriving, Hypercorn); edgeserve/http/dispatch.py answers the rest the same way."""
    params = request.path_params
    return to_response(await answer_infer(request, params["model"], params.get("version")))


infer.required_scope = "infer"  # type: ignore[attr-defined]  # what the audit row names


async def answer_infer(request: Request, model: str, version: str | None) -> RestAnswer:
    """The REST rules of one inference, whichever way it is written back: scope `infer`,
    the data plane (edgeserve/serving/pipeline.py, which reads the body only once the
    model is known and leaves the telemetry record), the encoded answer or the error
    document. Never raises: a failure is its answer."""
    try:
        principal = await authorize(request, "infer")
        served = await _pipeline(request).serve(
            model, version, partial(_read_request, request), request.headers, principal
        )
        return _encoded(served)
    except Exception as exc:  # the one mapping of errors to answers (edgeserve/http/errors.py)
        return answer_error(request, exc)


_NO_OUTPUTS: Mapping[str, bool] = MappingProxyType({})  # no output asked for its form


def _encoded(served: Served) -> RestAnswer:
    """A served inference as the V2 response (JSON, or the binary tensor extension)."""
    decoded = served.request
    assert decoded is not None
    model = served.model
    default = decoded.binary_output
    # an output named in the request may ask for binary data itself (most name none)
    binary = (
        {o.name: o.binary for o in decoded.outputs if o.binary is not None}
        if decoded.outputs
        else _NO_OUTPUTS
    )
    outputs = [InferOutput(n, a, binary.get(n, default)) for n, a in served.outputs.items()]
    body, header_length = encode_response(
        InferResponse(model.name, str(model.version), decoded.id, outputs)
    )
    headers = [(b"x-request-id", header_text(served.request_id).encode("latin-1"))]
    if served.experiment:
        variant = f"{served.experiment}/{served.variant}"
        headers.append((b"x-edgeserve-variant", variant.encode("latin-1")))
    if header_length is not None:
        headers.append((b"inference-header-content-length", str(header_length).encode()))
        headers.append((b"content-type", OCTETS))
    else:
        headers.append((b"content-type", JSON_TYPE))
    if served.seq_id:
        headers.append((TELEMETRY_SEQ, served.seq_id.encode()))
    return RestAnswer(200, headers, body)


async def _read_request(request: Request) -> InferRequest:
    """The body's envelope and tensor headers (JSON, or the binary tensor extension)."""
    headers = request.headers
    _check_content_type(headers)
    state = request.app.state
    limits = state.settings.limits
    body = await read_body(request, limits.max_body_bytes, limits.accept_compressed)
    header = headers.get(HEADER_LENGTH)
    length = None
    if header is not None:
        length = parse_uint(header)
        if length is None:
            raise InvalidInput("Inference-Header-Content-Length is not a number")
    return decode_request(body, length, state.decode_limits)


@requires("read")
async def model_statistics(request: Request) -> Response:
    return json_response(
        documents.model_statistics(
            _registry(request), request.path_params.get("model"), _version_param(request)
        )
    )


@requires("read")
async def repository_index(request: Request) -> Response:
    registry = _registry(request)
    body = await read_body(request, 64 * 1024)
    ready_only = False
    if body.strip():
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidInput("request body is not valid JSON") from None
        ready_only = isinstance(doc, dict) and doc.get("ready") is True
    return json_response(documents.repository_index(registry, ready_only))


@requires("admin")
async def repository_load(request: Request) -> Response:
    """Triton's explicit model control: (re)load a model from the repository."""
    parameters = await _control_parameters(request)
    await model_control.load_model(request.app.state, request.path_params["model"], parameters)
    return json_response({})


@requires("admin")
async def repository_unload(request: Request) -> Response:
    """Triton's explicit model control: stop serving every version of a model."""
    parameters = await _control_parameters(request)
    await model_control.unload_model(request.app.state, request.path_params["model"], parameters)
    return json_response({})


async def _control_parameters(request: Request) -> dict[str, Any]:
    """The `parameters` object of a load/unload body (an empty body has none)."""
    doc = await read_json_object(request, 64 * 1024, allow_empty=True)
    parameters = doc.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    return parameters


# As Triton does, a missing or form content type is read as JSON: `curl -d @req.json`
# sends application/x-www-form-urlencoded.
_BODY_TYPES = (
    "",
    "application/json",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
)


def _check_content_type(headers: Headers) -> None:
    media = headers.get("content-type", "")
    if media in _BODY_TYPES:  # as most clients send it
        return
    media = media.split(";", 1)[0].strip().lower()
    if media not in _BODY_TYPES:
        raise UnsupportedMediaType(
            f"content type {media[:40]!r} is not accepted; send application/json "
            "(or application/octet-stream with Inference-Header-Content-Length)"
        )


_MODEL = "/v2/models/{model:str}"
_VERSION = "/v2/models/{model:str}/versions/{version:str}"

# The infer routes come first: the router tries routes in order, and they carry the traffic.
ROUTES = [
    Route(_MODEL + "/infer", infer, methods=["POST"]),
    Route(_VERSION + "/infer", infer, methods=["POST"]),
    Route("/v2/health/live", server_live, methods=["GET"]),
    Route("/v2/health/ready", server_ready, methods=["GET"]),
    Route("/v2", server_metadata, methods=["GET"]),
    Route("/v2/models/stats", model_statistics, methods=["GET"]),
    Route("/v2/repository/index", repository_index, methods=["POST"]),
    Route("/v2/repository/models/{model:str}/load", repository_load, methods=["POST"]),
    Route("/v2/repository/models/{model:str}/unload", repository_unload, methods=["POST"]),
]
for _prefix in (_MODEL, _VERSION):
    ROUTES += [
        Route(_prefix, model_metadata, methods=["GET"]),
        Route(_prefix + "/ready", model_ready, methods=["GET"]),
        Route(_prefix + "/config", model_config, methods=["GET"]),
        Route(_prefix + "/stats", model_statistics, methods=["GET"]),
    ]
