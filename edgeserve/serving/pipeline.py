"""The one data plane: every inference, whatever its transport, goes through `DataPlane.serve`.

REST JSON and binary, gRPC unary and stream, the WebSocket and shadow copies are adapters:
they decode their wire format into an `InferRequest` (the envelope and declared tensor
headers; data decoded on demand) and encode the `Served` answer, or map the domain error
(edgeserve/errors.py) to their own status. The order is fixed, so a rule holds for every
way in:

1. resolve the model and version to the registry's canonical names (an unknown name is a
   404 counted in one unlabelled counter, never a label or a telemetry row);
2. the kill switch (`model.<name>` flag), whatever way the version was named;
3. experiment routing (when no version is named), overload check, cheap checks of the
   declared shapes, only then the tensor data, then the [features] lookup;
4. the deadline, then the batcher (`model.infer`, called nowhere else);
5. exactly one telemetry record, with the prediction, the experiment labels and the
   subject hash; a client that went away is status 499, not an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeserve.errors import (
    ClientClosed,
    DeadlineExceeded,
    EdgeserveError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
)
from edgeserve.experiments.flags import model_flag
from edgeserve.experiments.model import Variant
from edgeserve.experiments.router import Routing
from edgeserve.protocol.integers import parse_uint
from edgeserve.protocol.types import InferRequest
from edgeserve.serving.admission import SERVER_BUSY_MESSAGE
from edgeserve.serving.checks import check_declared
from edgeserve.serving.classification import classified
from edgeserve.serving.features import with_features
from edgeserve.serving.prediction import prediction_of
from edgeserve.serving.registry import ModelVersion
from edgeserve.serving.request_ids import new_request_id
from edgeserve.serving.scheduler import RETRY_AFTER, RunResult, request_deadline
from edgeserve.telemetry.records import REQUEST_ID_CHARS, InferenceRecord

log = logging.getLogger(__name__)

CLIENT_CLOSED = ClientClosed.status  # the caller went away: not an error
UNKNOWN_MODEL_COUNTER = "edgeserve_unknown_model_requests"

# The request, decoded already (gRPC, WebSocket) or read on demand (REST reads its body
# only once the model is known to exist).
Source = InferRequest | Callable[[], Awaitable[InferRequest]]


class Served:
    """One inference as it went: what the transport encodes, and what telemetry records.

    A plain class, its fields class defaults: a request starts with all but `model`
    untouched, and a dataclass __init__ would assign the twelve of them each time."""

    model: ModelVersion
    request: InferRequest | None = None
    request_id: str = ""  # at most REQUEST_ID_CHARS: what telemetry stores
    result: RunResult | None = None
    experiment: str | None = None
    variant: str | None = None
    unit: str | None = None  # the experiment's unit id (header, claim), recorded hashed
    prediction: str | None = None
    top_score: float | None = None
    seq: int = 0  # the telemetry record's sequence number, 0 when none was kept
    classified: dict[str, np.ndarray] | None = None  # outputs as top-k classes, if asked
    seq_id: str = ""  # "<boot>-<seq>": what the client can check (x-telemetry-seq)

    def __init__(self, model: ModelVersion) -> None:
        self.model = model

    @property
    def outputs(self) -> dict[str, np.ndarray]:
        """What the transport sends: the model's outputs, classified where asked."""
        if self.classified is not None:
            return self.classified
        assert self.result is not None
        return self.result.outputs


class DataPlane:
    """Inference over the app's registry, flags, experiments, features and telemetry
    (all read from the app `state` at call time, as the lifespan sets them)."""

    def __init__(self, state: Any) -> None:
        self._state = state
        self.unknown_requests = 0  # requests naming a model or version that does not exist

    def unknown_counts(self) -> dict[tuple[str, ...], float]:
        """The unlabelled counter of requests for unknown names (for /metrics)."""
        return {(): self.unknown_requests}

    # -- step 1: names ---------------------------------------------------------------
    def resolve(self, name: str, version: str | None, count: bool = True) -> ModelVersion:
        """The loaded version `name`/`version` names; ModelNotFound (counted, with the
        client's text cut short) when there is no such model or version, ModelNotReady
        while it loads."""
        if version is not None:
            number = parse_uint(version)
            if number is None:
                self._unknown(count)
                raise ModelNotFound(f"unknown version '{version[:32]}' of model '{name[:64]}'")
            version = str(number)
        try:
            return self._state.registry.get(name, version)
        except ModelNotFound:
            self._unknown(count)
            if version is None:
                raise ModelNotFound(f"unknown model '{name[:64]}'") from None
            raise ModelNotFound(f"unknown version '{version}' of model '{name[:64]}'") from None

    def _unknown(self, count: bool) -> None:
        if count:
            self.unknown_requests += 1

    # -- step 2: kill switch and readiness --------------------------------------------
    def killed(self, name: str) -> bool:
        """Whether the model's flag switches it off for everyone."""
        service = self._state.experiments
        if service is None:
            return False
        flag = service.router.flags.get(model_flag(name))
        return flag is not None and (not flag.enabled or flag.rollout_percent <= 0)

    def refuse_killed(self, name: str) -> None:
        """Raise the kill switch's 503 when the model is switched off for everyone."""
        if self.killed(name):
            raise _switched_off(name)

    def model_ready(self, name: str, version: str | None) -> bool:
        """Ready = loaded and not switched off; an unknown name raises ModelNotFound."""
        try:
            model = self.resolve(name, version, count=False)
        except ModelNotReady:
            return False
        return not self.killed(model.name)

    def server_ready(self) -> bool:
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """Why the server must not get traffic now, else None: the one readiness check of
        every transport (HTTP /v2/health/ready, gRPC ServerReady). Not ready: no token
        could pass (serving would answer every caller 401), a model is still loading or
        its default does not serve, or every model is switched off (one killed model
        must not take the whole box out of its load balancer)."""
        unusable = getattr(getattr(self._state, "authenticator", None), "unusable_reason", None)
        reason = unusable() if unusable is not None else None
        if reason is not None:
            return str(reason)
        registry = self._state.registry
        if not registry.ready:
            return "models are loading or not serving (see POST /v2/repository/index)"
        if not any(not self.killed(name) for name in registry.names()):
            return "every model is switched off"
        return None

    # -- the request ---------------------------------------------------------------
    async def serve(
        self,
        name: str,
        version: str | None,
        source: Source,
        meta: Mapping[str, str],
        principal: Any = None,
        *,
        timeout_ms: float | None = None,
        gated: bool = False,
        stream: bool = False,
    ) -> Served:
        """Serve one request (the steps in the module doc) and leave its telemetry record.

        `meta` is the transport's headers or metadata (the experiment unit, the subject,
        `x-request-id`, `x-request-timeout-ms`); `timeout_ms` a transport deadline (gRPC's);
        `gated` passes the event loop's gate (edgeserve/serving/admission.py) for transports whose
        requests do not pass it in the HTTP parser; `stream` says `meta` belongs to a
        connection carrying many requests, so its `x-request-id` names none of them."""
        started = time.perf_counter()
        state = self._state
        try:
            model = self.resolve(name, version)
        except ModelNotReady as exc:  # a known model still loading: recorded like any answer
            number = parse_uint(version) if version is not None else None
            loading = _LoadingModel(name, "" if number is None else str(number))
            served = Served(loading)  # type: ignore[arg-type]
            served.request_id = _bounded(None if stream else meta.get("x-request-id"))
            served.seq = self._record(served, exc.status, started, meta, principal)
            exc.telemetry_seq = served.seq_id  # type: ignore[attr-defined]
            raise
        served = Served(model)
        status = 500
        gate = None
        checking = computing = False  # the request reached the model / its scheduler
        failure: Exception | None = None
        try:
            if gated:
                gate = state.loop_gate
                if gate is not None and not gate.admit():
                    gate = None
                    model.stats.shed += 1
                    raise Overloaded(SERVER_BUSY_MESSAGE)
            self.refuse_killed(model.name)  # before the body: a killed model costs no read
            request = source if isinstance(source, InferRequest) else await source()
            served.request = request
            served.request_id = _bounded(
                request.id or (None if stream else meta.get("x-request-id"))
            )
            if timeout_ms is None:
                timeout_ms = _timeout_header(meta.get("x-request-timeout-ms"))
            elif timeout_ms <= 0:  # a transport deadline (gRPC's) already passed
                raise DeadlineExceeded("the request's deadline passed before it could run")
            deadline = request_deadline(timeout_ms, request.parameters.get("timeout"))
            routing = self._route(served, version, meta, principal)
            model = served.model
            if getattr(model.scheduler, "full", False):
                # refused before decoding: under overload the tensor data is the cost to save
                raise Overloaded("the model's queue is full; retry later", headers=RETRY_AFTER)
            checking = True
            check_declared(model, request.inputs)
            decoding = time.perf_counter()  # Triton's compute_input: decoding and the check
            named: Mapping[str, tuple[str, np.ndarray]] = request.data()
            features = model.config.features
            if features.table:  # inputs a model.toml [features] table fills in
                looking_up = time.perf_counter()
                named = await with_features(
                    state, features, model.inputs, named, request.parameters
                )
                decoding += time.perf_counter() - looking_up  # the lookup is not compute_input
            feed = model.check_inputs(named)
            input_s = time.perf_counter() - decoding
            requested = request.requested()
            model.check_outputs(requested)
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("the request's deadline passed before it could run")
            computing = True  # from here model.infer counts a failure itself
            result = await model.infer(feed, requested, deadline=deadline, input_s=input_s)
            served.result = result
            finishing = time.perf_counter()
            served.prediction, served.top_score = prediction_of(result.outputs)
            if request.outputs:  # only a requested output can ask for its top-k classes
                served.classified = classified(
                    result.outputs,
                    request.outputs,
                    model.config.labels,
                    model.config.max_batch_size > 0,
                )
            # Triton's compute_output time (its count moved with the other two in infer)
            if not result.cached:
                model.stats.output_took(time.perf_counter() - finishing)
            status = 200
            if routing is not None and routing.shadow is not None:
                self._launch_shadow(served, routing, routing.shadow, feed, requested, meta)
            return served
        except EdgeserveError as exc:
            status = exc.status
            failure = exc
            if status == CLIENT_CLOSED:
                log.info("client closed request model=%s request_id=%s", name, served.request_id)
            elif checking and not computing:  # refused by the model's checks: Triton's fail
                served.model.stats.fail.add(time.perf_counter() - started)
            raise
        except asyncio.CancelledError:  # a cancelled gRPC call, a dropped WebSocket
            status = CLIENT_CLOSED
            log.info("client closed request model=%s request_id=%s", name, served.request_id)
            raise
        except Exception as exc:  # answered 500 by the transport: its record says so too
            failure = exc
            raise
        finally:
            if gate is not None:
                gate.leave()
            served.seq = self._record(served, status, started, meta, principal)
            if failure is not None:  # the error answer carries the record's id as well
                failure.telemetry_seq = served.seq_id  # type: ignore[attr-defined]

    def _route(
        self, served: Served, version: str | None, meta: Mapping[str, str], principal: Any
    ) -> Routing | None:
        """Kill switch for every way of naming the model, then the experiment's variant
        when no version was named (served.model becomes the routed version)."""
        service = self._state.experiments
        if service is None:
            return None
        router = service.router
        name = served.model.name
        if not router.model_allowed(name, meta.get("x-user-id") or served.request_id):
            raise _switched_off(name)  # a partial rollout: this unit is not in it
        if version is not None:
            return None
        routing = router.route(name, _unit_reader(meta, principal, served.request_id))
        if routing.version is not None:
            served.experiment, served.variant = routing.experiment, routing.variant
            served.unit = routing.unit
            served.model = self._state.registry.get(name, str(routing.version))
        return routing

    # -- telemetry -----------------------------------------------------------------
    def _record(
        self,
        served: Served,
        status: int,
        started: float,
        meta: Mapping[str, str],
        principal: Any = None,
    ) -> int:
        recorder = self._state.recorder
        if recorder is None:
            return 0
        if not served.request_id:
            served.request_id = new_request_id()
        model = served.model
        seq = recorder.record_ended(
            InferenceRecord.ended(
                served.request_id,
                model.name,
                str(model.version),
                status,
                started,
                served.result,
                top_score=served.top_score,
                subject_hash=self._subject_hash(recorder, meta),
                experiment=served.experiment,
                variant=served.variant,
                prediction=served.prediction,
                owner_hash=_owner_hash(recorder, principal),
                unit_hash=recorder.subject_hash(served.unit) if served.unit else None,
            )
        )
        served.seq_id = recorder.record_id(seq) if seq else ""
        return seq

    def _subject_hash(self, recorder: Any, meta: Mapping[str, str]) -> str | None:
        """The keyed hash of the subject header's value (what `forget` looks for)."""
        header = self._state.subject_header
        subject = meta.get(header) if header else None
        return recorder.subject_hash(subject) if subject else None

    # -- shadow copies -------------------------------------------------------------
    def _launch_shadow(
        self,
        served: Served,
        routing: Routing,
        variant: Variant,
        feed: dict[str, np.ndarray],
        requested: Sequence[str] | None,
        meta: Mapping[str, str],
    ) -> None:
        """Start the shadow copy in the background if a slot is free; it never touches
        the real answer, and its outcome only becomes a record marked `shadow`."""
        service = self._state.experiments
        if service.shadow_in_flight >= service.settings.shadow_max_in_flight:
            service.shadow_skipped += 1
            return
        recorder = self._state.recorder
        subject_hash = self._subject_hash(recorder, meta) if recorder is not None else None
        unit_hash = recorder.subject_hash(served.unit) if recorder and served.unit else None
        service.shadow_in_flight += 1
        task = asyncio.create_task(
            self._shadow(
                served.model.name,
                routing,
                variant,
                feed,
                requested,
                served.request_id,
                subject_hash,
                unit_hash,
            )
        )
        service.shadow_tasks.add(task)
        task.add_done_callback(service.shadow_tasks.discard)

    async def _shadow(
        self,
        name: str,
        routing: Routing,
        variant: Variant,
        feed: dict[str, np.ndarray],
        requested: Sequence[str] | None,
        request_id: str,
        subject_hash: str | None,
        unit_hash: str | None,
    ) -> None:
        state = self._state
        started = time.perf_counter()
        status, result, prediction = 200, None, None
        try:
            candidate = state.registry.get(name, str(variant.version))
            result = await candidate.infer(feed, requested)
            prediction = prediction_of(result.outputs)
        except EdgeserveError as exc:
            status = exc.status
        except Exception as exc:  # a shadow must never disturb anything; keep the reason
            status = 500
            log.warning(
                "shadow failed model=%s version=%s error=%r", name, variant.version, str(exc)[:200]
            )
        finally:
            state.experiments.shadow_in_flight -= 1
        recorder = state.recorder
        if recorder is not None:
            recorder.record_ended(
                InferenceRecord.ended(
                    request_id,
                    name,
                    str(variant.version),
                    status,
                    started,
                    result,
                    experiment=routing.experiment,
                    variant=variant.name,
                    top_score=None if prediction is None else prediction[1],
                    subject_hash=subject_hash,
                    unit_hash=unit_hash,
                    shadow=True,
                    prediction=None if prediction is None else prediction[0],
                )
            )


@dataclass(slots=True)
class _LoadingModel:
    """The name and version a still-loading model's 503 is recorded under."""

    name: str
    version: str


def _switched_off(name: str) -> ModelNotReady:
    return ModelNotReady(f"model '{name}' is switched off by flag '{model_flag(name)}'")


def _timeout_header(value: str | None) -> int | None:
    """X-Request-Timeout-Ms: whole milliseconds, 1-18 ASCII digits (0 is refused later)."""
    if value is None:
        return None
    milliseconds = parse_uint(value)
    if milliseconds is None:
        raise InvalidInput("X-Request-Timeout-Ms must be whole milliseconds (ASCII digits)")
    return milliseconds


def _bounded(request_id: str | None) -> str:
    """The request id as stored: the client's, cut to REQUEST_ID_CHARS, or a new one."""
    return request_id[:REQUEST_ID_CHARS] if request_id else new_request_id()


def _unit_reader(
    meta: Mapping[str, str], principal: Any, request_id: str
) -> Callable[[str], str | None]:
    """How an experiment's unit spec reads this request: header:X, claim:C, request_id."""

    def read(spec: str) -> str | None:
        if spec == "request_id":
            return request_id
        kind, _, key = spec.partition(":")
        if kind == "header":
            return meta.get(key.lower())
        value = principal.claims.get(key) if principal is not None else None
        return str(value) if value is not None else None

    return read


def _owner_hash(recorder: Any, principal: Any) -> str | None:
    """Keyed hash of the token subject that made a request (None without a token): the
    one caller allowed to label it without scope `feedback`."""
    subject = getattr(principal, "subject", None)
    return recorder.subject_hash(subject) if subject else None
