"""KServe V2 gRPC (`inference.GRPCInferenceService`) in the server's own process and loop.

It shares the registry, the batchers and the authenticator with the HTTP side, so a
request takes the same way through either door. The message classes are the ones
`tritonclient[grpc]` ships (generated from Triton's `grpc_service.proto`), which keeps
the wire format identical to what `tritonclient.grpc` expects. Domain errors become gRPC
status codes in `_abort`; RPCs not listed here answer UNIMPLEMENTED.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.requests import Request
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from edgeserve.auth.authenticator import NO_TOKEN_CHALLENGE
from edgeserve.auth.guard import authenticate
from edgeserve.config import Settings
from edgeserve.errors import (
    EdgeserveError,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    Unauthorized,
)
from edgeserve.protocol import documents
from edgeserve.protocol.grpc_stream import stream_replies
from edgeserve.protocol.grpc_telemetry import record_grpc_inference
from edgeserve.protocol.limits import DecodeLimits, checked_shape
from edgeserve.registry import Registry
from edgeserve.runtime.datatypes import V2_TO_NUMPY, v2_datatype_of
from edgeserve.scheduling import request_deadline
from edgeserve.web.shedding import SERVER_BUSY_MESSAGE

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M")  # a protobuf message

_STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# Typed `contents` fields per V2 datatype (FP16 has none: it travels only as raw bytes).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def status_code_for(status: int) -> grpc.StatusCode:
    """The gRPC code for one of our HTTP-shaped domain error statuses."""
    if status in _STATUS_CODES:
        return _STATUS_CODES[status]
    return grpc.StatusCode.INVALID_ARGUMENT if status < 500 else grpc.StatusCode.INTERNAL


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The V2 RPCs over the app's registry; each checks the caller's scope first."""

    def __init__(self, app: Starlette) -> None:
        self._app = app
        self._limits: DecodeLimits = app.state.decode_limits

    @property
    def _registry(self) -> Registry:
        return self._app.state.registry

    async def _guard(self, context: grpc.aio.ServicerContext, scope: str | None) -> None:
        """The HTTP authenticator, fed the `authorization` metadata through a request shim."""
        if scope is None:
            return
        headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in (context.invocation_metadata() or ())
            if k == "authorization" and isinstance(v, str)
        ]
        shim = Request(
            {
                "type": "http",
                "app": self._app,
                "method": "POST",
                "path": "/inference.GRPCInferenceService",
                "headers": headers,
                "query_string": b"",
                "client": (_peer_host(context.peer()), 0),
            }
        )
        principal = await authenticate(shim)
        if principal.anonymous and scope not in principal.scopes:
            raise Unauthorized("invalid token: missing token", headers=dict(NO_TOKEN_CHALLENGE))
        principal.require(scope)

    async def _call(
        self, context: grpc.aio.ServicerContext, scope: str | None, work: Callable[[], Awaitable[T]]
    ) -> T:
        try:
            await self._guard(context, scope)
            return await work()
        except EdgeserveError as exc:
            await context.abort(status_code_for(exc.status), exc.message)
        except Exception:
            log.exception("grpc call failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable: abort raises")

    # -- health and metadata -------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._registry.ready)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        async def work() -> pb.ModelReadyResponse:
            try:
                self._registry.get(request.name, request.version or None)
            except ModelNotReady:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=True)

        return await self._call(context, "read", work)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        async def work() -> pb.ServerMetadataResponse:
            return _message(documents.server_metadata(), pb.ServerMetadataResponse())

        return await self._call(context, "read", work)

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        async def work() -> pb.ModelMetadataResponse:
            doc = documents.model_metadata(self._registry, request.name, request.version or None)
            return _message(doc, pb.ModelMetadataResponse())

        return await self._call(context, "read", work)

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        async def work() -> pb.ModelConfigResponse:
            model = self._registry.get(request.name, request.version or None)
            config = _message(documents.model_config(model), mc.ModelConfig())
            return pb.ModelConfigResponse(config=config)

        return await self._call(context, "read", work)

    async def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        async def work() -> pb.ModelStatisticsResponse:
            doc = documents.model_statistics(
                self._registry, request.name or None, request.version or None
            )
            return _message(doc, pb.ModelStatisticsResponse())

        return await self._call(context, "read", work)

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        async def work() -> pb.RepositoryIndexResponse:
            index = documents.repository_index(self._registry, request.ready)
            return _message({"models": index}, pb.RepositoryIndexResponse())

        return await self._call(context, "read", work)

    # -- inference -----------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        return await self._call(context, "infer", lambda: self.infer_one(request, context))

    async def ModelStreamInfer(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's bidirectional stream (tritonclient's start_stream/async_stream_infer)."""
        try:
            await self._guard(context, "infer")
        except EdgeserveError as exc:
            await context.abort(status_code_for(exc.status), exc.message)
        async for reply in stream_replies(self.infer_one, request_iterator, context):
            yield reply

    async def infer_one(self, request: Any, context: Any) -> pb.ModelInferResponse:
        """One ModelInferRequest through the registry and its batcher (caller checked),
        leaving a telemetry record whatever the outcome.

        It passes the event loop's gate as HTTP inferences do (edgeserve/loop_lag.py):
        both doors share the one loop, so it counts in flight while answered and is
        refused its share (RESOURCE_EXHAUSTED) while the loop runs late.
        """
        started = time.perf_counter()
        status, result, version = 500, None, request.model_version
        gate = None
        try:
            model = self._registry.get(request.model_name, request.model_version or None)
            version = str(model.version)
            gate = self._app.state.loop_gate
            if gate is not None and not gate.admit():
                gate = None
                model.stats.shed += 1
                raise Overloaded(SERVER_BUSY_MESSAGE)
            named = decode_inputs(request, self._limits)
            feed = model.check_inputs(named)
            requested = [o.name for o in request.outputs] or None
            model.check_outputs(requested)
            remaining = context.time_remaining()
            timeout = request.parameters.get("timeout")
            deadline = request_deadline(
                remaining * 1000 if remaining is not None else None,
                timeout.int64_param if timeout is not None else None,
            )
            result = await model.infer(feed, requested, deadline=deadline)
            status = 200
            return encode_response(model.name, version, request.id, result.outputs)
        except EdgeserveError as exc:
            status = exc.status
            raise
        finally:
            if gate is not None:
                gate.leave()
            record_grpc_inference(
                self._app.state, request, context, version, status, result, started
            )


def _message(doc: dict[str, Any], message: M) -> M:
    """A protocol document (edgeserve/protocol/documents.py) as a gRPC message."""
    return json_format.ParseDict(doc, message, ignore_unknown_fields=True)


def decode_inputs(
    request: pb.ModelInferRequest, limits: DecodeLimits
) -> dict[str, tuple[str, np.ndarray]]:
    """Request tensors by name, from `raw_input_contents` or the typed `contents`."""
    if not request.inputs:
        raise InvalidInput("'inputs' must be a non-empty list")
    if len(request.inputs) > limits.max_inputs:
        raise InvalidInput(f"{len(request.inputs)} inputs exceed the limit of {limits.max_inputs}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput("raw_input_contents must hold one entry per input")
    named: dict[str, tuple[str, np.ndarray]] = {}
    for i, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in named:
            raise InvalidInput("input names must be unique")
        dtype = V2_TO_NUMPY.get(tensor.datatype)
        if dtype is None:
            raise InvalidInput(f"input '{name}': unknown datatype {tensor.datatype[:32]!r}")
        shape, count = checked_shape(list(tensor.shape), name, limits)
        if raw:
            array = _from_raw(raw[i], tensor.datatype, dtype, count, name, limits)
        else:
            array = _from_contents(tensor, dtype, name)
        if array.size != count:
            raise InvalidInput(
                f"input '{name}': {array.size} elements do not match shape {list(shape)}"
            )
        named[name] = (tensor.datatype, array.reshape(shape))
    return named


def _from_raw(
    blob: bytes, datatype: str, dtype: np.dtype, count: int, name: str, limits: DecodeLimits
) -> np.ndarray:
    if datatype != "BYTES":
        if len(blob) != count * dtype.itemsize:
            raise InvalidInput(f"input '{name}': {len(blob)} raw bytes do not fit its shape")
        return np.frombuffer(blob, dtype=dtype.newbyteorder("<"))
    out = np.empty(count, dtype=object)
    view, pos = memoryview(blob), 0
    for i in range(count):
        length = int.from_bytes(view[pos : pos + 4], "little") if pos + 4 <= len(view) else -1
        pos += 4
        if length < 0 or length > limits.max_bytes_element or pos + length > len(view):
            raise InvalidInput(f"input '{name}': BYTES raw data is truncated or too long")
        out[i] = bytes(view[pos : pos + length])
        pos += length
    if pos != len(view):
        raise InvalidInput(f"input '{name}': BYTES raw data has trailing bytes")
    return out


def _from_contents(tensor: Any, dtype: np.dtype, name: str) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise InvalidInput(f"input '{name}': {tensor.datatype} must be sent as raw contents")
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        out = np.empty(len(values), dtype=object)
        out[:] = list(values)
        return out
    array = np.asarray(values)
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(f"input '{name}': a value is out of range for {tensor.datatype}")
    return array.astype(dtype, copy=False)


def encode_response(
    model: str, version: str, request_id: str, outputs: dict[str, np.ndarray]
) -> pb.ModelInferResponse:
    """Outputs as `raw_output_contents` (what tritonclient reads), little-endian."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for name, array in outputs.items():
        datatype = v2_datatype_of(array)
        response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype == "BYTES":
            parts = []
            for value in array.reshape(-1):
                item = value if isinstance(value, bytes) else str(value).encode("utf-8")
                parts += [len(item).to_bytes(4, "little"), item]
            response.raw_output_contents.append(b"".join(parts))
        else:
            little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            response.raw_output_contents.append(little.tobytes())
    return response


def _peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' / 'ipv6:[::1]:5000' -> the address, as HTTP's client host."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return "unknown"


async def start_grpc_server(app: Starlette, settings: Settings) -> grpc.aio.Server:
    """Serve V2 gRPC on `[server] grpc_port` with the HTTP side's TLS settings."""
    s = settings.server
    server = grpc.aio.server(
        options=[
            # the body limit plus room for the protobuf framing around the tensors
            ("grpc.max_receive_message_length", settings.limits.max_body_bytes + 64 * 1024),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(app), server)
    host = f"[{s.host}]" if ":" in s.host else s.host
    address = f"{host}:{s.grpc_port}"
    if s.tls_cert is not None and s.tls_key is not None:
        client_ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    await server.start()
    log.info("grpc listening address=%s tls=%s", address, s.tls_cert is not None)
    return server
