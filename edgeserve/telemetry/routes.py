"""HTTP endpoints of telemetry: Prometheus scrape, feedback, KPI events, status, forget."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeserve.auth.guard import requires
from edgeserve.auth.principal import SCOPE_FEEDBACK
from edgeserve.errors import InvalidInput, ModelNotReady
from edgeserve.http.body import read_json_object
from edgeserve.telemetry.maintenance import dead_letter_count, drop_counts
from edgeserve.telemetry.records import (
    LABEL_CHARS,
    REQUEST_ID_CHARS,
    EventRecord,
    FeedbackRecord,
)
from edgeserve.telemetry.service import Telemetry
from edgeserve.telemetry.store import durable_marks

MAX_BODY_BYTES = 64 * 1024


def _telemetry(request: Request) -> Telemetry:
    telemetry = getattr(request.app.state, "telemetry", None)
    if telemetry is None:
        raise ModelNotReady("telemetry is switched off ([telemetry] enabled = false)")
    return telemetry


async def _json_object(request: Request) -> dict[str, Any]:
    return await read_json_object(request, MAX_BODY_BYTES)


def _text(doc: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = doc.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise InvalidInput(f"'{key}' must be a non-empty string of at most 256 characters")
    return value


def _ok(doc: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json")


@requires("metrics")
async def metrics(request: Request) -> Response:
    body, content_type = await _telemetry(request).render_metrics()
    return Response(body, media_type=content_type)


@requires("infer", SCOPE_FEEDBACK)
async def feedback(request: Request) -> Response:
    """Ground truth for an earlier request: {"request_id", "label"} or {"request_id", "correct"};
    one label per request id, from the caller that made it (or scope `feedback`)."""
    doc = await _json_object(request)
    request_id = _text(doc, "request_id")
    label = doc.get("label")
    correct = doc.get("correct")
    if label is not None and not isinstance(label, (str, int)):
        raise InvalidInput("'label' must be a string or an integer")
    if correct is not None and not isinstance(correct, bool):
        raise InvalidInput("'correct' must be true or false")
    if label is None and correct is None:
        raise InvalidInput("give 'label' or 'correct'")
    telemetry = _telemetry(request)
    principal = request.state.principal
    # A labelling service (scope `feedback`) may label any request; anyone else only
    # the requests their own token subject made (edgeserve/telemetry/feedback.py).
    owner = None if principal.holds(SCOPE_FEEDBACK) else telemetry.subject_hash(principal.subject)
    # Cut as an inference's request id and prediction are, so that the two still join
    # and compare however long the client's text.
    seq = await telemetry.accept_feedback(
        FeedbackRecord(
            str(request_id)[:REQUEST_ID_CHARS],
            None if label is None else str(label)[:LABEL_CHARS],
            correct,
            time.time(),
        ),
        owner,
    )
    return _ok({"accepted": bool(seq), "seq": seq}, 202)


@requires("infer")
async def events(request: Request) -> Response:
    """A business KPI event: {"name", "value", "unit"}; the unit is stored as a keyed hash."""
    doc = await _json_object(request)
    name = _text(doc, "name")
    value = doc.get("value", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput("'value' must be a number")
    unit = _text(doc, "unit", required=False)
    telemetry = _telemetry(request)
    seq = telemetry.record_event(
        EventRecord(
            str(name), float(value), telemetry.subject_hash(unit) if unit else None, time.time()
        )
    )
    return _ok({"accepted": bool(seq), "seq": seq}, 202)


@requires("read")
async def status(request: Request) -> Response:
    telemetry = _telemetry(request)
    store = telemetry.store
    drops = await _in_writer(telemetry, drop_counts)
    marks = await _in_writer(telemetry, durable_marks)
    dead = await _in_writer(telemetry, dead_letter_count)
    sync = telemetry.sync
    return _ok(
        {
            # x-telemetry-seq "<boot>-<seq>" is durable once durable[<boot>] >= seq.
            "boot_id": store.boot_id,
            "durable_seq": store.durable_seq,
            "durable": marks,
            "queued_in_memory": store.backlog_in_memory(),
            "dropped": {f"{t}/{r}": n for (t, r), n in drops.items()},
            "dropped_queue_full": store.dropped,
            "write_errors": store.write_errors,
            "unsynced_records": telemetry.unsynced_records,
            "dead_letters": {
                "records": dead,
                "max_records": telemetry.settings.upstream.dead_letter_max_records,
            },
            "alerts_firing": sorted(telemetry.firing),
            "quarantined": None
            if store.quarantined is None
            else {"file": store.quarantined[0].name, "unsynced_rows": store.quarantined[1]},
            "upstream": None
            if sync is None
            else {
                "sent_records": sync.sent_records,
                "failures": sync.failures,
                "rejected_in_row": sync.rejected_in_row,
                "breaker_open": sync.breaker_open,
                "retry_in_s": sync.retry_in_s,
                "paced_s": sync.paced_s,
                "lag_s": sync.lag_s,
            },
            "data_region": store.data_region,
        }
    )


@requires("admin")
async def forget(request: Request) -> Response:
    """Delete a subject's rows here and queue a forget request for upstream."""
    doc = await _json_object(request)
    subject = _text(doc, "subject")
    telemetry = _telemetry(request)
    removed = await telemetry.forget(str(subject))
    audit = getattr(request.app.state, "audit", None)  # edgeserve.audit, when wired
    if audit is not None:
        audit.record(
            "telemetry.forget",
            "subject",
            "ok",
            subject=request.state.principal.subject,
            detail={"rows": removed},
        )
    return _ok({"removed_rows": removed})


async def _in_writer(telemetry: Telemetry, fn: Any) -> Any:
    return await asyncio.wrap_future(telemetry.store.submit(fn))


ROUTES = [
    Route("/metrics", metrics, methods=["GET"]),
    Route("/api/feedback", feedback, methods=["POST"]),
    Route("/api/events", events, methods=["POST"]),
    Route("/api/telemetry/status", status, methods=["GET"]),
    Route("/api/telemetry/forget", forget, methods=["POST"]),
]
