"""What telemetry records: one row per inference, feedback label, KPI event, alert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


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


class Recorder(Protocol):
    """Where the request path hands records; must never block and never raise."""

    def record_inference(self, record: InferenceRecord) -> int: ...


class NullRecorder:
    """Telemetry off: records go nowhere."""

    def record_inference(self, record: InferenceRecord) -> int:
        return 0
