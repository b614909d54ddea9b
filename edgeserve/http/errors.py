"""The one place where errors become HTTP responses: `{"error": "..."}` with its status.

Unknown exceptions become a bare 500 with a request id to find the log line; the
exception text never reaches the client.
"""

from __future__ import annotations

import logging
import uuid

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from edgeserve.errors import EdgeserveError
from edgeserve.http.answers import JSON, RestAnswer, to_response
from edgeserve.http.headers import TELEMETRY_SEQ
from edgeserve.telemetry.records import record_id_of

log = logging.getLogger(__name__)


def error_answer(
    status: int, message: str, headers: dict[str, str] | None = None, seq_id: str = ""
) -> RestAnswer:
    """The V2 error body; `seq_id` is the telemetry record the failed request left, if any."""
    raw = [(b"content-type", JSON)]
    if headers:
        raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    if seq_id:
        raw.append((TELEMETRY_SEQ, seq_id.encode()))
    return RestAnswer(status, raw, orjson.dumps({"error": message}))


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, seq_id: str = ""
) -> Response:
    """`error_answer` as a Starlette response."""
    return to_response(error_answer(status, message, headers, seq_id))


def answer_error(request: Request, exc: Exception) -> RestAnswer:
    """The answer to a request that failed with `exc`: a domain error's own status and
    message, anything else a 500 whose incident id finds the logged traceback."""
    if isinstance(exc, EdgeserveError):
        if exc.status >= 500:
            log.warning(
                "request failed path=%s status=%s error=%r",
                request.url.path,
                exc.status,
                exc.message,
            )
        return error_answer(exc.status, exc.message, exc.headers, record_id_of(exc))
    incident = uuid.uuid4().hex[:12]
    log.error("unhandled error incident=%s path=%s", incident, request.url.path, exc_info=exc)
    return error_answer(500, f"internal error (incident {incident})", seq_id=record_id_of(exc))


async def on_edgeserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EdgeserveError)
    return to_response(answer_error(request, exc))


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    messages = {404: "no such endpoint", 405: "method not allowed for this endpoint"}
    message = messages.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, message, dict(exc.headers or {}))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    return to_response(answer_error(request, exc))


EXCEPTION_HANDLERS = {
    EdgeserveError: on_edgeserve_error,
    HTTPException: on_http_exception,
    Exception: on_unexpected,
}
