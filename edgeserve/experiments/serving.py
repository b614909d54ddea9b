"""Experiments on the request path: pick the variant, copy the request to a shadow.

A shadow run never touches the real response: it starts after the response is ready,
is bounded by `shadow_max_in_flight` (excess copies are skipped and counted), and its
outcome, success or failure, only becomes a telemetry record marked `shadow`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from starlette.requests import Request

from edgeserve.errors import EdgeserveError, ModelNotReady
from edgeserve.experiments.model import Variant
from edgeserve.experiments.router import NO_EXPERIMENT, Routing
from edgeserve.telemetry.records import InferenceRecord

log = logging.getLogger(__name__)


def unit_of(request: Request, request_id: str) -> Callable[[str], str | None]:
    """How an experiment's unit spec reads this request: header:X, claim:C, request_id."""

    def read(spec: str) -> str | None:
        if spec == "request_id":
            return request_id
        kind, _, name = spec.partition(":")
        if kind == "header":
            return request.headers.get(name)
        principal = getattr(request.state, "principal", None)
        value = principal.claims.get(name) if principal is not None else None
        return str(value) if value is not None else None

    return read


def route(request: Request, model: str, request_id: str) -> Routing:
    """The variant for this request, or NO_EXPERIMENT; refuses a model switched off by flag."""
    service = getattr(request.app.state, "experiments", None)
    if service is None:
        return NO_EXPERIMENT
    router = service.router
    if not router.model_allowed(model, request.headers.get("x-user-id") or request_id):
        raise ModelNotReady(f"model '{model}' is switched off by flag 'model.{model}'")
    return router.route(model, unit_of(request, request_id))


def launch_shadow(
    request: Request,
    model: str,
    routing: Routing,
    feed: dict[str, np.ndarray],
    requested: Sequence[str] | None,
    request_id: str,
    subject_hash: str | None,
    prediction_of: Callable[[dict], Any],
) -> None:
    """Start the shadow copy in the background if a slot is free."""
    state = request.app.state
    service = state.experiments
    if routing.shadow is None or service is None:
        return
    if service.shadow_in_flight >= service.settings.shadow_max_in_flight:
        service.shadow_skipped += 1
        return
    service.shadow_in_flight += 1
    task = asyncio.create_task(
        _shadow(
            state,
            model,
            routing,
            routing.shadow,
            feed,
            requested,
            request_id,
            subject_hash,
            prediction_of,
        )
    )
    service.shadow_tasks.add(task)
    task.add_done_callback(service.shadow_tasks.discard)


async def _shadow(
    state: Any,
    model: str,
    routing: Routing,
    variant: Variant,
    feed: dict[str, np.ndarray],
    requested: Sequence[str] | None,
    request_id: str,
    subject_hash: str | None,
    prediction_of: Callable[[dict], Any],
) -> None:
    started = time.perf_counter()
    status, result, prediction = 200, None, None
    try:
        candidate = state.registry.get(model, str(variant.version))
        result = await candidate.infer(feed, requested)
        prediction = prediction_of(result.outputs)
    except EdgeserveError as exc:
        status = exc.status
    except Exception as exc:  # a shadow must never disturb anything; keep the reason
        status = 500
        log.warning(
            "shadow failed model=%s version=%s error=%r", model, variant.version, str(exc)[:200]
        )
    finally:
        state.experiments.shadow_in_flight -= 1
    recorder = state.recorder
    if recorder is not None:
        recorder.record_inference(
            InferenceRecord.ended(
                request_id,
                model,
                str(variant.version),
                status,
                started,
                result,
                experiment=routing.experiment,
                variant=variant.name,
                top_score=None if prediction is None else prediction[1],
                subject_hash=subject_hash,
                shadow=True,
                prediction=None if prediction is None else prediction[0],
            )
        )
