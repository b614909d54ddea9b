"""What telemetry records: one row per inference, feedback label, KPI event, alert, audit entry.

Fields are declared in the order of their table's columns (the writer inserts
`astuple(record)` as is), so a new field is one line here and one in the schema.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol


class Timing(Protocol):
    """What the batcher reports of one request's run (edgeserve.scheduling.RunResult)."""

    queue_s: float
    compute_s: float
    batch_size: int


@dataclass(frozen=True, slots=True)
class InferenceRecord:
    """One inference request as it ended. No payload: only what operators and experiments need."""

    request_id: str
    model: str
    version: str
    status: int
    total_s: float
    queue_s: float
    compute_s: float
    batch_size: int
    time_unix: float
    experiment: str | None = None
    variant: str | None = None
    top_score: float | None = None
    subject_hash: str | None = None
    shadow: bool = False
    error: str | None = None
    prediction: str | None = None  # the top class of a one-row classification, for accuracy

    @classmethod
    def ended(
        cls,
        request_id: str,
        model: str,
        version: str,
        status: int,
        started: float,
        run: Timing | None,
        **labels: Any,
    ) -> InferenceRecord:
        """The record of a request that began at `time.perf_counter()` == `started` and
        ends now; queue/compute split and batch size from `run` (None: it never ran)."""
        return cls(
            request_id=request_id,
            model=model,
            version=version,
            status=status,
            total_s=time.perf_counter() - started,
            queue_s=run.queue_s if run else 0.0,
            compute_s=run.compute_s if run else 0.0,
            batch_size=run.batch_size if run else 0,
            time_unix=time.time(),
            **labels,
        )


@dataclass(frozen=True, slots=True)
class FeedbackRecord:
    """Ground truth for an earlier request, sent later by the application."""

    request_id: str
    label: str | None
    correct: bool | None
    time_unix: float


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A business KPI event (a conversion, a basket value) for a unit."""

    name: str
    value: float
    subject_hash: str | None
    time_unix: float


@dataclass(frozen=True, slots=True)
class AlertRecord:
    """An alert rule changing state (firing or resolved)."""

    rule: str
    state: str
    value: float
    message: str
    time_unix: float


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """Who did what to the box; chained by hash when written (see `audit.py`)."""

    action: str
    target: str
    outcome: str
    subject: str
    detail: str  # JSON text
    time_unix: float


@dataclass(frozen=True, slots=True)
class PayloadRecord:
    """A request body kept for debugging, only where a model opts in; sealed with
    AES-256-GCM before it is queued (see `payloads.py`), never sent upstream."""

    request_id: str
    model: str
    version: str
    nonce: bytes
    ciphertext: bytes
    time_unix: float


class Recorder(Protocol):
    """Where the request path hands records; must never block and never raise."""

    def record_inference(self, record: InferenceRecord) -> int:
        """Queue the record; its sequence number (compare with `durable_seq`), 0 if dropped."""
        ...

    def subject_hash(self, subject: str) -> str: ...


class NullRecorder:
    """Telemetry off: records go nowhere."""

    def record_inference(self, record: InferenceRecord) -> int:
        return 0

    def subject_hash(self, subject: str) -> str:
        return ""
