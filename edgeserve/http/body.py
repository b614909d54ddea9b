"""Read a request body within a byte limit, checked on the header and on the stream."""

from __future__ import annotations

from starlette.requests import Request

from edgeserve.errors import ClientClosed, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from edgeserve.protocol.integers import parse_uint


async def read_body(request: Request, max_bytes: int, accept_compressed: bool = False) -> bytes:
    """The whole body, refusing it as soon as it is known to exceed `max_bytes`; a
    client that disconnects meanwhile is `ClientClosed` (499), not a server error.
    Reads the request's stream once, as Starlette's `Request.body()` would."""
    encoding = request.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", "") and not accept_compressed:
        raise UnsupportedMediaType(f"compressed request bodies ({encoding[:20]}) are not accepted")
    declared = request.headers.get("content-length")
    if declared is not None:
        length = parse_uint(declared)
        if length is None:
            raise InvalidInput("Content-Length is not a number")
        if length > max_bytes:
            raise PayloadTooLarge(
                f"request body of {declared} bytes exceeds the limit of {max_bytes}"
            )
    # The ASGI messages themselves, not Starlette's `stream()`: an async generator costs
    # the event loop more than the one message a small inference body arrives in.
    chunks = []
    received = 0
    receive = request.receive
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.disconnect":
            raise ClientClosed("the client disconnected before its request body was read")
        if kind != "http.request":
            continue
        chunk = message.get("body", b"")
        if chunk:
            received += len(chunk)
            if received > max_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {max_bytes} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
