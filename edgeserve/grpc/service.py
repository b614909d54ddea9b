"""KServe V2 gRPC (`inference.GRPCInferenceService`) in the server's own process and loop.

It shares the registry, the batchers and the authenticator with the HTTP side, so a
request takes the same way through either door. The message classes are the ones
`tritonclient[grpc]` ships (generated from Triton's `grpc_service.proto`), which keeps
the wire format identical to what `tritonclient.grpc` expects. Domain errors become gRPC
status codes in `_call`; RPCs not offered here (shared memory, tracing) and unknown
methods answer UNIMPLEMENTED with one INFO line.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.requests import Request
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from edgeserve.auth.authenticator import NO_TOKEN_CHALLENGE
from edgeserve.auth.guard import authenticate, still_authenticated
from edgeserve.auth.principal import Principal
from edgeserve.config.loader import Settings
from edgeserve.errors import EdgeserveError, InvalidInput, Unauthorized
from edgeserve.grpc.stream import stream_replies
from edgeserve.protocol.grpc_codec import decode_request, encode_response
from edgeserve.protocol.limits import DecodeLimits
from edgeserve.protocol.types import InferRequest
from edgeserve.serving import documents, model_control
from edgeserve.serving.registry import Registry
from edgeserve.telemetry.records import RECORD_ID_NAME, record_id_of

log = logging.getLogger(__name__)

MAX_DEADLINE_MS = 1e11  # about three years

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
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
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

    async def _guard(
        self, context: grpc.aio.ServicerContext, scope: str | None
    ) -> Principal | None:
        """The HTTP authenticator, fed the `authorization` metadata through a request shim."""
        if scope is None:
            return None
        principal = await authenticate(self._shim(context))
        if principal.anonymous and scope not in principal.scopes:
            raise Unauthorized("invalid token: missing token", headers=dict(NO_TOKEN_CHALLENGE))
        principal.require(scope)
        return principal

    def _shim(self, context: grpc.aio.ServicerContext) -> Request:
        """The call as the authenticator reads a request: its `authorization` and peer."""
        headers = [  # every value: two of them are refused as over HTTP
            (k.encode("latin-1"), v.strip(" \t").encode("latin-1"))
            for k, v in (context.invocation_metadata() or ())
            if k == "authorization" and isinstance(v, str)
        ]
        return Request(
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

    async def _call(
        self,
        context: grpc.aio.ServicerContext,
        scope: str | None,
        work: Callable[[Principal | None], Awaitable[T]],
    ) -> T:
        try:
            return await work(await self._guard(context, scope))
        except EdgeserveError as exc:
            await context.abort(status_code_for(exc.status), exc.message, _seq_trailer(exc))
        except Exception as exc:
            log.exception("grpc call failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error", _seq_trailer(exc))
        raise AssertionError("unreachable: abort raises")

    # -- health and metadata -------------------------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._app.state.pipeline.server_ready())

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        async def work(_principal: Principal | None) -> pb.ModelReadyResponse:
            ready = self._app.state.pipeline.model_ready(request.name, request.version or None)
            return pb.ModelReadyResponse(ready=ready)

        return await self._call(context, "read", work)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        async def work(_principal: Principal | None) -> pb.ServerMetadataResponse:
            return _message(documents.server_metadata(), pb.ServerMetadataResponse())

        return await self._call(context, "read", work)

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        async def work(_principal: Principal | None) -> pb.ModelMetadataResponse:
            doc = documents.model_metadata(self._registry, request.name, request.version or None)
            return _message(doc, pb.ModelMetadataResponse())

        return await self._call(context, "read", work)

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        async def work(_principal: Principal | None) -> pb.ModelConfigResponse:
            model = self._registry.get(request.name, request.version or None)
            config = _message(documents.model_config(model), mc.ModelConfig())
            return pb.ModelConfigResponse(config=config)

        return await self._call(context, "read", work)

    async def ModelStatistics(self, request: Any, context: Any) -> pb.ModelStatisticsResponse:
        async def work(_principal: Principal | None) -> pb.ModelStatisticsResponse:
            doc = documents.model_statistics(
                self._registry, request.name or None, request.version or None
            )
            return _message(doc, pb.ModelStatisticsResponse())

        return await self._call(context, "read", work)

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        async def work(_principal: Principal | None) -> pb.RepositoryIndexResponse:
            index = documents.repository_index(self._registry, request.ready)
            return _message({"models": index}, pb.RepositoryIndexResponse())

        return await self._call(context, "read", work)

    # -- explicit model control (admin) ---------------------------------------------
    async def RepositoryModelLoad(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        async def work(_principal: Principal | None) -> pb.RepositoryModelLoadResponse:
            _one_repository(request.repository_name)
            params = _repository_parameters(request.parameters)
            await model_control.load_model(self._app.state, request.model_name, params)
            return pb.RepositoryModelLoadResponse()

        return await self._call(context, "admin", work)

    async def RepositoryModelUnload(
        self, request: Any, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        async def work(_principal: Principal | None) -> pb.RepositoryModelUnloadResponse:
            _one_repository(request.repository_name)
            params = _repository_parameters(request.parameters)
            await model_control.unload_model(self._app.state, request.model_name, params)
            return pb.RepositoryModelUnloadResponse()

        return await self._call(context, "admin", work)

    # -- inference -----------------------------------------------------------------
    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        return await self._call(
            context, "infer", lambda principal: self.infer_one(request, context, principal)
        )

    async def ModelStreamInfer(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's bidirectional stream (tritonclient's start_stream/async_stream_infer)."""
        principal = None
        try:
            principal = await self._guard(context, "infer")
        except EdgeserveError as exc:
            await context.abort(status_code_for(exc.status), exc.message)

        def infer_one(request: Any, context: Any) -> Awaitable[pb.ModelInferResponse]:
            return self.infer_one(request, context, principal, stream=True)

        refused: list[EdgeserveError] = []

        async def while_authenticated() -> AsyncIterator[Any]:
            # Each request is read only while the token still holds (expiry, a key
            # rotated out): then the stream stops reading, answers what is in flight,
            # and ends UNAUTHENTICATED.
            async for request in request_iterator:
                try:
                    await still_authenticated(self._shim(context))
                except EdgeserveError as exc:
                    refused.append(exc)
                    return
                yield request

        async for reply in stream_replies(infer_one, while_authenticated(), context):
            yield reply
        if refused:
            await context.abort(status_code_for(refused[0].status), refused[0].message)

    async def infer_one(
        self, request: Any, context: Any, principal: Principal | None = None, stream: bool = False
    ) -> pb.ModelInferResponse:
        """One ModelInferRequest through the data plane (caller checked): the same steps
        and telemetry record as over HTTP.

        It passes the event loop's gate as HTTP inferences do (edgeserve/serving/admission.py):
        both doors share the one loop, so it counts in flight while answered and is
        refused its share (RESOURCE_EXHAUSTED) while the loop runs late.
        """
        remaining = context.time_remaining()
        served = await self._app.state.pipeline.serve(
            request.model_name,
            request.model_version or None,
            partial(_decoded, request, self._limits),
            _metadata(context),
            principal,
            # a deadline decades away is no deadline (and stays inside the float range)
            timeout_ms=min(remaining * 1000, MAX_DEADLINE_MS) if remaining is not None else None,
            gated=True,
            stream=stream,
        )
        model = served.model
        response = encode_response(model.name, str(model.version), request.id, served.outputs)
        if served.seq_id and stream:  # one trailer per stream: the id goes with its answer
            response.parameters[RECORD_ID_NAME].string_param = served.seq_id
        elif served.seq_id:
            context.set_trailing_metadata(((RECORD_ID_NAME, served.seq_id),))
        return response


def _seq_trailer(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a refused or failed call: the telemetry record it left
    (`x-telemetry-seq`, as over HTTP), if any."""
    seq_id = record_id_of(exc)
    return ((RECORD_ID_NAME, seq_id),) if seq_id else ()


def _unimplemented(method: str) -> Callable[..., Awaitable[Any]]:
    """A V2 RPC this server does not offer (shared memory, tracing, logging settings):
    UNIMPLEMENTED with one INFO line, not the generated stub's traceback."""

    async def refuse(self: Any, request: Any, context: Any) -> Any:
        await _refuse_unimplemented(method, context)

    refuse.__name__ = method
    return refuse


async def _refuse_unimplemented(method: str, context: Any) -> None:
    log.info("grpc method not implemented method=%s peer=%s", method[:100], context.peer())
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method[:100]} is not implemented")


for _method in dir(pb_grpc.GRPCInferenceServiceServicer):
    if not _method.startswith("_") and _method not in vars(InferenceService):
        setattr(InferenceService, _method, _unimplemented(_method))


class _UnknownMethods(grpc.GenericRpcHandler):
    """Any other method (another service, a newer RPC): the same UNIMPLEMENTED answer."""

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)

        async def refuse(request: Any, context: Any) -> None:
            await _refuse_unimplemented(method, context)

        return grpc.unary_unary_rpc_method_handler(refuse)


def _one_repository(name: str) -> None:
    if name:
        raise InvalidInput("repository_name: this server has one model repository; leave it empty")


def _repository_parameters(params: Any) -> dict[str, Any]:
    """`ModelRepositoryParameter`s as plain values."""
    if len(params) > model_control.MAX_PARAMETERS:
        raise InvalidInput(f"more than {model_control.MAX_PARAMETERS} parameters")
    out: dict[str, Any] = {}
    for key, param in params.items():
        choice = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, choice) if choice is not None else None
    return out


async def _decoded(request: Any, limits: DecodeLimits) -> InferRequest:
    return decode_request(request, limits)


def _metadata(context: Any) -> dict[str, str]:
    """The call's text metadata, by lower-case key (gRPC sends keys in lower case), each
    value without surrounding blanks, as an HTTP parser gives a header: perf_analyzer's
    `-H "authorization: Bearer X"` arrives as the value " Bearer X"."""
    return {
        k: v.strip(" \t") for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)
    }


def _message(doc: dict[str, Any], message: M) -> M:
    """A protocol document (edgeserve/serving/documents.py) as a gRPC message."""
    return json_format.ParseDict(doc, message, ignore_unknown_fields=True)


def _peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5000' / 'ipv6:[::1]:5000' -> the address, as HTTP's client host."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rpartition(":")[0].strip("[]")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return "unknown"


async def start_grpc_server(app: Starlette, settings: Settings) -> tuple[grpc.aio.Server, int]:
    """Serve V2 gRPC on `[server] grpc_port` with the HTTP side's TLS settings; return the
    server and the port it bound (the kernel's choice for "auto")."""
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
    server.add_generic_rpc_handlers((_UnknownMethods(),))  # consulted after the service
    host = f"[{s.host}]" if ":" in s.host else s.host
    address = f"{host}:{0 if s.grpc_port == 'auto' else s.grpc_port}"
    if s.tls_cert is not None and s.tls_key is not None:
        client_ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    log.info("grpc listening address=%s:%d tls=%s", host, port, s.tls_cert is not None)
    return server, port
