"""Telemetry records for gRPC inferences (ModelInfer and each ModelStreamInfer request):
an inference over gRPC is an inference like any other, so it leaves the same record as
one over HTTP or a WebSocket, whatever its outcome."""

from __future__ import annotations

from typing import Any

from edgeserve.request_ids import new_request_id
from edgeserve.scheduling import RunResult
from edgeserve.telemetry.records import InferenceRecord


def record_grpc_inference(
    state: Any,
    request: Any,
    context: Any,
    version: str,
    status: int,
    result: RunResult | None,
    started: float,
) -> None:
    """Queue the record (never blocks); the caller's subject comes from the metadata key
    named by `[telemetry] subject_header`, hashed as over HTTP."""
    recorder = getattr(state, "recorder", None)
    if recorder is None:
        return
    header = (getattr(state, "subject_header", "") or "").lower()
    subject = next(
        (v for k, v in (context.invocation_metadata() or ()) if k == header and isinstance(v, str)),
        None,
    )
    recorder.record_inference(
        InferenceRecord.ended(
            request.id[:128] or new_request_id(),
            request.model_name[:256],
            version,
            status,
            started,
            result,
            subject_hash=recorder.subject_hash(subject) if subject else None,
        )
    )
