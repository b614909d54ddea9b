"""Telemetry records for gRPC inferences (ModelInfer and each ModelStreamInfer request):
an inference over gRPC is an inference like any other, so it leaves the same record as
one over HTTP or a WebSocket, whatever its outcome."""

from __future__ import annotations

import time
from typing import Any

from edgeserve.batching import RunResult
from edgeserve.request_ids import new_request_id
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
        InferenceRecord(
            request_id=request.id[:128] or new_request_id(),
            model=request.model_name[:256],
            version=version,
            status=status,
            total_s=time.perf_counter() - started,
            queue_s=result.queue_s if result else 0.0,
            compute_s=result.compute_s if result else 0.0,
            batch_size=result.batch_size if result else 0,
            time_unix=time.time(),
            subject_hash=recorder.subject_hash(subject) if subject else None,
        )
    )
