"""What telemetry records: one row per inference, feedback label, KPI event, alert, audit entry.

Fields are declared in the order of their table's columns (the writer inserts the
record's values as they are), so a new field is one line here and one in the schema.

An inference record is what the request path hands over, so it is a plain tuple (a
NamedTuple: about a third of a frozen dataclass's cost to build) and every text field
has a bound, applied before it is queued: a client's 1 MB request id must not sit in
memory, in SQLite or upstream at full length. `InferenceRecord.ended`, which makes the
request path's records, cuts them as it makes them (a slice of a str within its bound
is that same str); a record made any other way is cut by `bounded` when it is queued.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple, Protocol

REQUEST_ID_CHARS = 128
LABEL_CHARS = 128  # model, version, experiment, variant, prediction
ERROR_CHARS = 512
SUBJECT_HASH_CHARS = 32  # the keyed hash is 32 hex digits (service.hash_subject)
# Where an answer carries the id ("<boot>-<seq>") of the record its request left, named
# alike on every transport: HTTP's header, gRPC's trailer and response parameter, a
# stream message's field.
RECORD_ID_NAME = "x-telemetry-seq"


def record_id_of(exc: BaseException) -> str:
    """The record a failed request left (the data plane sets it on the error), or ""."""
    value = getattr(exc, "telemetry_seq", "")
    return value if isinstance(value, str) else ""


class Timing(Protocol):
    """What the batcher reports of one request's run (edgeserve.serving.scheduler.RunResult)."""

    queue_s: float
    compute_s: float
    batch_size: int


class InferenceRecord(NamedTuple):
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
    # Keyed hash of the token subject that made the request: only it may label it.
    owner_hash: str | None = None
    # Keyed hash of the experiment's randomisation unit (a header or claim), when it has
    # one: kept apart from subject_hash so that `forget` still finds the subject's rows.
    unit_hash: str | None = None

    @classmethod
    def ended(
        cls,
        request_id: str,
        model: str,
        version: str,
        status: int,
        started: float,
        run: Timing | None,
        *,
        experiment: str | None = None,
        variant: str | None = None,
        top_score: float | None = None,
        subject_hash: str | None = None,
        shadow: bool = False,
        error: str | None = None,
        prediction: str | None = None,
        owner_hash: str | None = None,
        unit_hash: str | None = None,
    ) -> InferenceRecord:
        """The record of a request that began at `time.perf_counter()` == `started` and
        ends now; queue/compute split and batch size from `run` (None: it never ran).
        Each text field (a str, or None where optional) is cut to its bound here, so the
        recorder queues it as it is (`Recorder.record_ended`).

        Built positionally with `tuple.__new__`: the NamedTuple constructor with keyword
        labels cost the event loop about five times as much (1.6 against 0.3 us)."""
        total_s = time.perf_counter() - started
        if run is None:
            queue_s = compute_s = 0.0
            batch_size = 0
        else:
            queue_s, compute_s, batch_size = run.queue_s, run.compute_s, run.batch_size
        return _new_tuple(
            cls,
            (
                request_id[_ID_CUT],
                model[_LABEL_CUT],
                version[_LABEL_CUT],
                status,
                total_s,
                queue_s,
                compute_s,
                batch_size,
                time.time(),
                experiment and experiment[_LABEL_CUT],
                variant and variant[_LABEL_CUT],
                top_score,
                subject_hash and subject_hash[_HASH_CUT],
                shadow,
                error and error[_ERROR_CUT],
                prediction and prediction[_LABEL_CUT],
                owner_hash and owner_hash[_HASH_CUT],
                unit_hash and unit_hash[_HASH_CUT],
            ),
        )


_new_tuple = tuple.__new__
# The cuts `ended` makes, as slice objects made once (`text[_ID_CUT]` is `text[:128]`).
_ID_CUT = slice(REQUEST_ID_CHARS)
_LABEL_CUT = slice(LABEL_CHARS)
_HASH_CUT = slice(SUBJECT_HASH_CHARS)
_ERROR_CUT = slice(ERROR_CHARS)

# (field index, most characters) of each text field of an InferenceRecord.
_TEXT_BOUNDS = (
    (0, REQUEST_ID_CHARS),
    (1, LABEL_CHARS),
    (2, LABEL_CHARS),
    (9, LABEL_CHARS),
    (10, LABEL_CHARS),
    (12, SUBJECT_HASH_CHARS),
    (14, ERROR_CHARS),
    (15, LABEL_CHARS),
    (16, SUBJECT_HASH_CHARS),
    (17, SUBJECT_HASH_CHARS),
)
INFERENCE_TEXT_FIELDS = tuple(index for index, _ in _TEXT_BOUNDS)
# Characters of text one bounded record can hold in all (the writer sizes its chunks by it).
MAX_INFERENCE_TEXT_CHARS = sum(limit for _, limit in _TEXT_BOUNDS)
# The byte cap of one inference row: UTF-8 takes at most 4 bytes a character, and the
# other eight fields are numbers (8 bytes each in SQLite).
MAX_INFERENCE_RECORD_BYTES = 4 * MAX_INFERENCE_TEXT_CHARS + 8 * 8


def bounded(record: InferenceRecord) -> InferenceRecord:
    """`record` itself when every text field is a str within its bound (the common case:
    a few `len` calls, no copy), else a copy with each one cut to its bound."""
    r = record
    if (
        type(r[0]) is str
        and len(r[0]) <= REQUEST_ID_CHARS
        and type(r[1]) is str
        and len(r[1]) <= LABEL_CHARS
        and type(r[2]) is str
        and len(r[2]) <= LABEL_CHARS
        and (r[9] is None or (type(r[9]) is str and len(r[9]) <= LABEL_CHARS))
        and (r[10] is None or (type(r[10]) is str and len(r[10]) <= LABEL_CHARS))
        and (r[12] is None or (type(r[12]) is str and len(r[12]) <= SUBJECT_HASH_CHARS))
        and (r[14] is None or (type(r[14]) is str and len(r[14]) <= ERROR_CHARS))
        and (r[15] is None or (type(r[15]) is str and len(r[15]) <= LABEL_CHARS))
        and (r[16] is None or (type(r[16]) is str and len(r[16]) <= SUBJECT_HASH_CHARS))
        and (r[17] is None or (type(r[17]) is str and len(r[17]) <= SUBJECT_HASH_CHARS))
    ):
        return r
    values = list(r)
    for index, limit in _TEXT_BOUNDS:
        value = values[index]
        if value is not None:
            values[index] = (value if type(value) is str else _text(value))[:limit]
    return InferenceRecord._make(values)


def _text(value: object) -> str:
    """A non-str where text belongs (a caller's bug, never a client's) as text, so the
    record is still written; the caller cuts it to its bound."""
    try:
        return str(value)
    except Exception:
        return type(value).__name__


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
        """Queue the record, cut to its bounds; its sequence number (compare with
        `durable_seq`), 0 if dropped."""
        ...

    def record_ended(self, record: InferenceRecord) -> int:
        """`record_inference` for a record made by `InferenceRecord.ended`, which is cut
        to its bounds already (the request path's: no second look at each field)."""
        ...

    def record_id(self, seq: int) -> str:
        """`<boot>-<seq>`: the id a client checks against the status's durable marks."""
        ...

    def subject_hash(self, subject: str) -> str: ...


class NullRecorder:
    """Telemetry off: records go nowhere."""

    def record_inference(self, record: InferenceRecord) -> int:
        return 0

    def record_ended(self, record: InferenceRecord) -> int:
        return 0

    def record_id(self, seq: int) -> str:
        return ""

    def subject_hash(self, subject: str) -> str:
        return ""
