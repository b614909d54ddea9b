"""An HTTP answer as plain data: status, headers, body bytes.

The infer endpoint's rules produce one (edgeserve/http/routes.py `answer_infer`), and two
ways write it: as a Starlette `Response` on the ASGI way, or straight onto the socket by
uvicorn's protocol (edgeserve/http/request_cycle.py), which skips building any response
object for the request that carries nearly all the traffic.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.responses import Response

JSON = b"application/json"
OCTETS = b"application/octet-stream"


@dataclass(slots=True)
class RestAnswer:
    """One answer. `headers` hold lower-case names and carry the content type, but neither
    the content length (the writer adds it) nor the security headers (both writers add
    the same `SECURITY_HEADERS`)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def to_response(answer: RestAnswer) -> Response:
    """`answer` as a Starlette response (Starlette adds the content length)."""
    response = Response(answer.body, status_code=answer.status)
    response.raw_headers.extend(answer.headers)
    return response
