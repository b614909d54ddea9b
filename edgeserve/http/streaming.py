"""Streaming inference over a WebSocket: `/api/stream/{model}` (`?version=N` optional).

The client sends one V2 infer request (the JSON body of `POST .../infer`) per message
and receives one V2 response per message, in the order sent; a message that fails
gets `{"error": "...", "status": <HTTP-style status>, "id": ...}` in its place and the
stream goes on. An answer that left a telemetry record carries its id (`<boot>-<seq>`,
what HTTP's `x-telemetry-seq` header carries): a response in
`parameters["x-telemetry-seq"]`, an error document as its `"x-telemetry-seq"` field. Each
message goes through the data plane (edgeserve/serving/pipeline.py) like any other
inference; messages still being computed when the client goes away are recorded as 499
(client closed request).

Backpressure: at most `[jobs] stream_window` messages are in flight (received, being
computed, or computed and waiting to be sent). When the client stops reading, sends
block on the socket, the window fills, the server stops reading the socket, and the
client's own sends block: memory per connection stays bounded by the window, never by
how far ahead the client runs. Each message passes the event loop's gate
(edgeserve/serving/admission.py) as HTTP and gRPC inferences do: a refused one gets
`{"error": ..., "status": 429}`. Authenticated with `@requires("infer")` at the
handshake (a refused handshake is an HTTP 403), and again before each message: once
the token has expired or its key was rotated out, the stream stops reading, sends what
is in flight and closes with 1008. A stream with nothing in flight that receives no
message for `[jobs] stream_idle_timeout_s` is closed (1000).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from edgeserve.auth.guard import requires, still_authenticated
from edgeserve.errors import EdgeserveError
from edgeserve.protocol.codec import decode_request, encode_response
from edgeserve.protocol.types import InferOutput, InferRequest, InferResponse
from edgeserve.telemetry.records import RECORD_ID_NAME, record_id_of

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000  # idle
CLOSE_POLICY = 1008  # refused: auth, unknown model, token expired mid-stream
CLOSE_TOO_BIG = 1009


async def stream(websocket: WebSocket) -> None:
    """The route endpoint: a refused handshake closes before accept (HTTP 403)."""
    try:
        await _authorized(websocket)
    except EdgeserveError as exc:
        if websocket.client_state.name == "CONNECTING":
            await websocket.close(code=CLOSE_POLICY, reason=exc.message[:120])
        else:
            with contextlib.suppress(Exception):
                await websocket.close(code=CLOSE_POLICY, reason=exc.message[:120])


@requires("infer")
async def _authorized(websocket: WebSocket) -> None:  # type: ignore[misc]
    state = websocket.app.state
    name = websocket.path_params["model"]
    version = websocket.query_params.get("version")
    state.pipeline.resolve(name, version)  # unknown or loading: refused before accept
    await websocket.accept()
    settings = state.settings.jobs
    pending: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue(settings.stream_window)
    ending: list[tuple[int, str]] = []  # why the reader stopped, if it closes the stream
    reader = asyncio.create_task(_read(websocket, pending, name, version, settings, ending))
    try:
        await _write(websocket, pending, settings.stream_send_timeout_s)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        while not pending.empty():
            task = pending.get_nowait()
            if task is not None:
                task.cancel()
    await _drain(
        websocket, settings.stream_send_timeout_s, *(ending[0] if ending else (CLOSE_NORMAL, ""))
    )


async def _drain(websocket: WebSocket, timeout_s: float, code: int, reason: str) -> None:
    """Close, then discard what the client still sends until it disconnects, for at
    most `timeout_s`. Hypercorn keeps feeding a connection's messages to the app even
    after it returned, and stops reading the socket while they are not taken, so a
    stalled stream is emptied for its socket to be freed; a client that keeps sending
    after our close is left to Hypercorn's own timeouts."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.close(code=code, reason=reason), 1.0)

    async def discard() -> None:
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    with contextlib.suppress(Exception):
        await asyncio.wait_for(discard(), timeout_s)


stream.required_scope = "infer"  # type: ignore[attr-defined]


async def _read(
    websocket: WebSocket,
    pending: asyncio.Queue,
    name: str,
    version: str | None,
    settings: Any,
    ending: list[tuple[int, str]],
) -> None:
    """Receive messages and start their inference; `put` blocks when the window is full,
    which is what stops the server reading a client that does not read.

    The end of input is queued for the writer (after what is in flight), except when
    the writer gave up and cancelled us: nobody would take it from the full window.
    A token that no longer holds, or an idle client, ends the input (`ending` says why)."""
    running: set[asyncio.Task[bytes]] = set()
    try:
        while True:
            message = await _receive(websocket, settings.stream_idle_timeout_s, running, pending)
            if message is None:
                ending.append((CLOSE_NORMAL, "idle timeout"))
                break
            if message["type"] == "websocket.disconnect":
                for task in running:  # nobody will read their answers: 499, not computed
                    task.cancel()
                break
            data = message.get("bytes")
            if data is None:
                data = (message.get("text") or "").encode()
            if len(data) > settings.stream_max_message_bytes:
                await websocket.close(code=CLOSE_TOO_BIG, reason="message too large")
                break
            try:
                await still_authenticated(websocket)
            except EdgeserveError as exc:  # expired, or its key rotated out: no more input
                ending.append((CLOSE_POLICY, exc.message[:120]))
                break
            task = asyncio.create_task(_infer_one(websocket, name, version, data))
            running.add(task)
            task.add_done_callback(running.discard)
            await pending.put(task)
    except asyncio.CancelledError:
        raise
    except Exception:  # the connection broke under us: end the stream like a disconnect
        log.info("stream input ended by a connection error model=%s", name)
    await pending.put(None)


async def _receive(
    websocket: WebSocket, idle_s: float, running: set, pending: asyncio.Queue
) -> Any:
    """The next message, or None once the client sent nothing for `idle_s` while nothing
    of its was in flight (a client waiting for a slow answer is not idle)."""
    while True:
        try:
            return await asyncio.wait_for(websocket.receive(), idle_s)
        except asyncio.TimeoutError:
            if not running and pending.empty():
                return None


async def _write(websocket: WebSocket, pending: asyncio.Queue, timeout_s: float) -> None:
    """Send results in the order their requests arrived.

    A send that cannot complete within `timeout_s` ends the stream: the client is gone
    or has stopped reading for that long. (Hypercorn delivers a disconnect only to a
    reader, and ours waits on the full window, so without the timeout a client that
    vanished mid-stall would hold the connection forever.)
    """
    while True:
        task = await pending.get()
        if task is None:
            return
        try:
            reply = await task
        except asyncio.CancelledError:
            if task.cancelled():  # the client went away (see _read)
                return
            raise
        try:
            await asyncio.wait_for(websocket.send_text(reply.decode()), timeout_s)
        except asyncio.TimeoutError:
            log.info("stream closed: client read nothing for %.1fs", timeout_s)
            return
        except (WebSocketDisconnect, RuntimeError, OSError):
            return


class _Message:
    """One message's body, decoded when the data plane asks; keeps the decoded request
    so that an error document can carry the message's id."""

    __slots__ = ("data", "decoded", "limits")

    def __init__(self, data: bytes, limits: Any) -> None:
        self.data = data
        self.limits = limits
        self.decoded: InferRequest | None = None

    async def __call__(self) -> InferRequest:
        self.decoded = decode_request(self.data, None, self.limits)
        return self.decoded


async def _infer_one(websocket: WebSocket, name: str, version: str | None, data: bytes) -> bytes:
    """One message's reply: a V2 response, or an error document with its status."""
    state = websocket.app.state
    message = _Message(data, state.decode_limits)
    try:
        served = await state.pipeline.serve(
            name,
            version,
            message,
            websocket.headers,
            getattr(websocket.state, "principal", None),
            gated=True,  # the HTTP parser's gate never sees a WebSocket message
            stream=True,
        )
        model = served.model
        outputs = [InferOutput(n, a, False) for n, a in served.outputs.items()]
        response = InferResponse(model.name, str(model.version), message.decoded.id, outputs)
        if served.seq_id:
            response.parameters[RECORD_ID_NAME] = served.seq_id
        body, _ = encode_response(response)
        return body
    except EdgeserveError as exc:
        doc: dict[str, Any] = {"error": exc.message, "status": exc.status}
        seq_id = record_id_of(exc)
    except Exception as exc:
        log.exception("stream message failed model=%s", name)
        doc = {"error": "internal error", "status": 500}
        seq_id = record_id_of(exc)
    if message.decoded is not None and message.decoded.id is not None:
        doc["id"] = message.decoded.id
    if seq_id:
        doc[RECORD_ID_NAME] = seq_id
    return orjson.dumps(doc)


ROUTES = [WebSocketRoute("/api/stream/{model:str}", stream)]
