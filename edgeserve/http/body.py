"""Read a request body within a byte limit, checked on the header and on the stream.

With `[limits] accept_compressed` a gzip or deflate body is inflated as it arrives, and
the limit holds for the inflated bytes; the inflated size may also be at most
`MAX_RATIO` times what arrived (plus `RATIO_SLACK_BYTES`), so a few KiB on the wire
never make the event loop inflate megabytes (a ratio bomb is 413 at once, counted).
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson
from starlette.requests import Request

from edgeserve.errors import ClientClosed, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from edgeserve.http.bounds import DECOMPRESSED_BODY
from edgeserve.protocol.integers import parse_uint

MAX_RATIO = 100  # inflated bytes per compressed byte; JSON tensors compress 3-20x
RATIO_SLACK_BYTES = 64 * 1024
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


async def read_body(request: Request, max_bytes: int, accept_compressed: bool = False) -> bytes:
    """The whole body, refusing it as soon as it is known to exceed `max_bytes`; a
    client that disconnects meanwhile is `ClientClosed` (499), not a server error.
    Reads the request's stream once, as Starlette's `Request.body()` would."""
    headers = request.headers
    encoding = headers.get("content-encoding", "identity")
    inflate = None
    if encoding != "identity":  # the usual case is without the header: nothing to test
        encoding = encoding.strip().lower()
        if encoding not in ("identity", ""):
            inflate = _inflater(encoding, accept_compressed)
    declared = headers.get("content-length")
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
    received = produced = 0
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
            if inflate is not None:
                chunk = _inflated(request, inflate, chunk, produced, received, max_bytes)
                produced += len(chunk)
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if inflate is not None:
        chunks.append(_inflated(request, inflate, b"", produced, received, max_bytes))
        if not inflate.eof:
            raise InvalidInput(f"the {encoding} body ends before its compressed stream does")
    return b"".join(chunks)


async def read_json_object(
    request: Request, max_bytes: int, *, allow_empty: bool = False
) -> dict[str, Any]:
    """A body that must be one JSON object, for the small control and feedback routes
    (one wording of their 400s); a blank body is `{}` when `allow_empty`."""
    body = await read_body(request, max_bytes)
    if allow_empty and not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request body must be a JSON object")
    return doc


def _inflater(encoding: str, accept_compressed: bool) -> Any:
    """The decompressor of a body sent with Content-Encoding `encoding` (normalised),
    or UnsupportedMediaType (415) when it is not accepted."""
    if not accept_compressed:
        raise UnsupportedMediaType(f"compressed request bodies ({encoding[:20]}) are not accepted")
    if encoding not in _WBITS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding[:20]} is not supported (gzip or deflate)"
        )
    return zlib.decompressobj(_WBITS[encoding])


def _inflated(
    request: Request, inflate: Any, data: bytes, produced: int, received: int, max_bytes: int
) -> bytes:
    """Inflate `data` (or flush, when empty) without ever producing more than allowed."""
    allowed = min(max_bytes, MAX_RATIO * received + RATIO_SLACK_BYTES) - produced
    try:
        out = inflate.decompress(data, allowed + 1) if data else inflate.flush(allowed + 1)
    except zlib.error:
        raise InvalidInput("the compressed body is not valid (gzip or deflate)") from None
    if len(out) > allowed:
        bounds = getattr(request.app.state, "bounds", None)
        if bounds is not None:
            bounds.hit(DECOMPRESSED_BODY)
        raise PayloadTooLarge(
            f"the decompressed body exceeds the limit of {max_bytes} bytes or "
            f"{MAX_RATIO} times its compressed size"
        )
    if inflate.unused_data:
        raise InvalidInput("bytes follow the end of the compressed body")
    return bytes(out)
