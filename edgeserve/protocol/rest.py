"""Open Inference Protocol (KServe V2) REST endpoints, plus Triton's statistics and
repository extensions so that `tritonclient.http` works unchanged."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeserve.auth.guard import requires
from edgeserve.errors import (
    EdgeserveError,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    UnsupportedMediaType,
)
from edgeserve.experiments.serving import launch_shadow
from edgeserve.experiments.serving import route as experiment_route
from edgeserve.features import with_features
from edgeserve.protocol import documents
from edgeserve.protocol.codec import HEADER_LENGTH, decode_request, encode_response
from edgeserve.protocol.types import InferOutput, InferResponse
from edgeserve.registry import Registry
from edgeserve.request_ids import new_request_id
from edgeserve.scheduling import RETRY_AFTER, RunResult, request_deadline
from edgeserve.telemetry.records import InferenceRecord
from edgeserve.web.body import read_body

JSON = "application/json"


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON, headers=headers)


def _registry(request: Request) -> Registry:
    return request.app.state.registry


async def server_live(request: Request) -> Response:
    return json_response({"live": True})


async def server_ready(request: Request) -> Response:
    ready = _registry(request).ready
    return json_response({"ready": ready}, 200 if ready else 503)


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
    registry = _registry(request)
    name = request.path_params["model"]
    try:
        registry.get(name, _version_param(request))
    except ModelNotReady:
        return json_response({"name": name, "ready": False}, 503)
    return json_response({"name": name, "ready": True})


@requires("read")
async def model_config(request: Request) -> Response:
    """Triton's model configuration, for clients that ask for it."""
    model = _registry(request).get(request.path_params["model"], _version_param(request))
    return json_response(documents.model_config(model))


@requires("infer")
async def infer(request: Request) -> Response:
    """Run one inference and leave a telemetry record of it, whatever the outcome."""
    started = time.perf_counter()
    trace = InferTrace(
        request.headers.get("x-request-id") or new_request_id(),
        request.path_params["model"],
        _version_param(request) or "",
    )
    try:
        response = await _infer(request, trace)
    except EdgeserveError as exc:
        _record(request, trace, exc.status, started)
        raise
    except Exception:
        _record(request, trace, 500, started)
        raise
    seq = _record(request, trace, 200, started)
    if seq:  # appended: the response has no such header, so there is nothing to replace
        response.raw_headers.append((b"x-telemetry-seq", str(seq).encode()))
    return response


@dataclass(slots=True)
class InferTrace:
    """What the telemetry record of a request needs, filled in as the request proceeds."""

    request_id: str
    model: str
    version: str
    result: RunResult | None = None
    top_score: float | None = None
    prediction: str | None = None
    experiment: str | None = None
    variant: str | None = None


def _record(request: Request, trace: InferTrace, status: int, started: float) -> int:
    recorder = getattr(request.app.state, "recorder", None)
    if recorder is None:
        return 0
    subject = request.headers.get(request.app.state.subject_header)
    return recorder.record_inference(
        InferenceRecord.ended(
            trace.request_id,
            trace.model,
            trace.version,
            status,
            started,
            trace.result,
            top_score=trace.top_score,
            subject_hash=recorder.subject_hash(subject) if subject else None,
            experiment=trace.experiment,
            variant=trace.variant,
            prediction=trace.prediction,
        )
    )


def _prediction(outputs: dict[str, np.ndarray]) -> tuple[str | None, float | None]:
    """(predicted class of a one-row request, mean top score) from a classifier's outputs.

    The class is an integer output with one element, else the argmax of the first
    [rows, classes] float output; the score is that output's mean row maximum. A one-row
    answer, the common case, costs one argmax.
    """
    label: str | None = None
    score: float | None = None
    for array in outputs.values():
        if array.dtype.kind in "iu" and array.size == 1 and label is None:
            label = str(array.reshape(-1)[0])
        elif array.ndim == 2 and array.dtype.kind == "f" and array.size and score is None:
            if array.shape[0] == 1:
                top = int(array[0].argmax())
                score = float(array[0, top])
                label = label if label is not None else str(top)
            else:
                score = float(array.max(axis=1).mean())
    return label, score


async def _infer(request: Request, trace: InferTrace) -> Response:
    settings = request.app.state.settings
    registry = _registry(request)
    name = request.path_params["model"]
    version = _version_param(request)
    registry.get(name, version)  # unknown or loading models are refused before the body is read
    _check_content_type(request)
    body = await read_body(
        request, settings.limits.max_body_bytes, settings.limits.accept_compressed
    )
    if getattr(registry.get(name, version).scheduler, "full", False):
        # Refused before decoding: under overload the JSON parse is the cost worth saving.
        raise Overloaded("the model's queue is full; retry later", headers=RETRY_AFTER)
    header = request.headers.get(HEADER_LENGTH)
    if header is not None and not header.isdigit():
        raise InvalidInput("Inference-Header-Content-Length is not a number")
    decoded = decode_request(
        body, int(header) if header is not None else None, request.app.state.decode_limits
    )
    if decoded.id:
        trace.request_id = decoded.id[:128]
    routing = experiment_route(request, name, trace.request_id) if version is None else None
    if routing is not None and routing.version is not None:
        version = str(routing.version)
        trace.experiment, trace.variant = routing.experiment, routing.variant
    model = registry.get(name, version)  # again: a hot swap may have happened meanwhile
    named = {t.name: (t.datatype, t.data) for t in decoded.inputs}
    named = await with_features(  # inputs a model.toml [features] table takes from the store
        request.app.state, model.config.features, model.inputs, named, decoded.parameters
    )
    feed = model.check_inputs(named)
    requested = [o.name for o in decoded.outputs] if decoded.outputs else None
    model.check_outputs(requested)
    deadline = request_deadline(
        request.headers.get("x-request-timeout-ms"), decoded.parameters.get("timeout")
    )
    trace.version = str(model.version)
    result = await model.infer(feed, requested, deadline=deadline)
    trace.result = result
    trace.prediction, trace.top_score = _prediction(result.outputs)
    binary = {o.name: o.binary for o in decoded.outputs or ()}
    outputs = [
        InferOutput(n, a, binary.get(n, decoded.binary_output)) for n, a in result.outputs.items()
    ]
    response_id = decoded.id
    body_out, header_length = encode_response(
        InferResponse(model.name, str(model.version), response_id, outputs)
    )
    headers = {"x-request-id": trace.request_id}
    if trace.experiment:
        headers["x-edgeserve-variant"] = f"{trace.experiment}/{trace.variant}"
    if routing is not None and routing.shadow is not None:
        subject = request.headers.get(request.app.state.subject_header)
        recorder = request.app.state.recorder
        launch_shadow(
            request,
            name,
            routing,
            feed,
            requested,
            trace.request_id,
            recorder.subject_hash(subject) if subject and recorder else None,
            _prediction,
        )
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
        return Response(body_out, media_type="application/octet-stream", headers=headers)
    return Response(body_out, media_type=JSON, headers=headers)


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


_BODY_TYPES = ("", "application/json", "application/octet-stream")


def _check_content_type(request: Request) -> None:
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
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
]
for _prefix in (_MODEL, _VERSION):
    ROUTES += [
        Route(_prefix, model_metadata, methods=["GET"]),
        Route(_prefix + "/ready", model_ready, methods=["GET"]),
        Route(_prefix + "/config", model_config, methods=["GET"]),
        Route(_prefix + "/stats", model_statistics, methods=["GET"]),
    ]
