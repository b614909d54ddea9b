"""The one place where errors become HTTP responses: `{"error": "..."}` with its status.

Unknown exceptions become a bare 500 with a request id to find the log line; the
exception text never reaches the client.
"""

from __future__ import annotations

import logging
import uuid

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from edgeserve.errors import EdgeserveError
from edgeserve.http.headers import TELEMETRY_SEQ

log = logging.getLogger(__name__)

JSON = "application/json"


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, seq_id: str = ""
) -> Response:
    """The V2 error body; `seq_id` is the telemetry record the failed request left, if any."""
    import orjson

    response = Response(
        orjson.dumps({"error": message}), status_code=status, media_type=JSON, headers=headers
    )
    if seq_id:
        response.raw_headers.append((TELEMETRY_SEQ, seq_id.encode()))
    return response


def _seq_id(exc: Exception) -> str:
    """Set by the data plane on an error whose request left a telemetry record."""
    value = getattr(exc, "telemetry_seq", "")
    return value if isinstance(value, str) else ""


async def on_edgeserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EdgeserveError)
    if exc.status >= 500:
        log.warning(
            "request failed path=%s status=%s error=%r", request.url.path, exc.status, exc.message
        )
    return error_response(exc.status, exc.message, exc.headers, _seq_id(exc))


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "no such endpoint", 405: "method not allowed for this endpoint"}
    message = messages.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, message, dict(exc.headers or {}))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    incident = uuid.uuid4().hex[:12]
    log.error("unhandled error incident=%s path=%s", incident, request.url.path, exc_info=exc)
    return error_response(500, f"internal error (incident {incident})", seq_id=_seq_id(exc))


EXCEPTION_HANDLERS = {
    EdgeserveError: on_edgeserve_error,
    HTTPException: on_http_exception,
    Exception: on_unexpected,
}
