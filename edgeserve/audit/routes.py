"""`GET /api/audit` (scope `admin`) and the middleware that audits admin requests and 403s.

The middleware is the safety net behind the explicit `record(...)` calls: every
non-GET request to an endpoint declared `@requires("admin")` leaves an `admin.request`
row (method, path, status) and every 403 leaves an `auth.forbidden` row, whether or
not the endpoint's owner remembered to record anything. 401s come from the
authenticator's `on_refused` hook instead, because they carry the reason.
"""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeserve.auth.guard import requires
from edgeserve.errors import InvalidInput, NotFound
from edgeserve.protocol.integers import parse_uint

MAX_LIMIT = 1000
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _since(value: str) -> tuple[int, int]:
    """(since_seq, since_ms) from `since`: a row number, or an ISO 8601 time."""
    if not value:
        return 0, 0
    seq = parse_uint(value)
    if seq is not None:
        return seq, 0
    try:
        when = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput("since: a row number or an ISO 8601 time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return 0, int(when.timestamp() * 1000)


def _limit(value: str) -> int:
    if not value:
        return 100
    limit = parse_uint(value)
    if limit is None or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit: an integer from 1 to {MAX_LIMIT}")
    return limit


def _iso(time_ms: int) -> str:
    when = datetime.datetime.fromtimestamp(time_ms / 1000, datetime.timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@requires("admin")
async def list_audit(request: Request) -> Response:
    """GET /api/audit?since=SEQ|ISO-TIME&limit=N: entries oldest first, `next` to page on."""
    audit = getattr(request.app.state, "audit", None)
    if audit is None:
        raise NotFound("the audit log is not running")
    since_seq, since_ms = _since(request.query_params.get("since", ""))
    limit = _limit(request.query_params.get("limit", ""))
    rows = await asyncio.to_thread(audit.read, since_seq, since_ms, limit)
    entries = [{"time": _iso(r["time_ms"]), **r} for r in rows]
    body: dict[str, Any] = {
        "entries": entries,
        "next": entries[-1]["seq"] if entries else since_seq,
    }
    return Response(orjson.dumps(body), media_type="application/json")


ROUTES = [Route("/api/audit", list_audit, methods=["GET"])]


class AuditMiddleware:
    """Pure ASGI: watches the response status, never touches the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            if status:
                audit_response(scope, status)


def audits_every_status(endpoint: object, method: str) -> bool:
    """Whether a `method` request to `endpoint` may leave a row whatever its status (an
    admin change); else only a 403 can. Asked once by a caller that answers a single
    endpoint (edgeserve/http/dispatch.py's inference), so that it calls
    `audit_response` only for a status that can need a row."""
    return getattr(endpoint, "required_scope", None) == "admin" and method not in READ_METHODS


def audit_response(scope: Scope, status: int) -> None:
    """The audit row an answered request leaves, if any (see the module doc)."""
    endpoint = scope.get("endpoint")
    required = getattr(endpoint, "required_scope", None)
    if required is None:
        return
    method = scope.get("method", "")
    if status != 403 and not audits_every_status(endpoint, method):
        return
    app = scope.get("app")
    audit = getattr(getattr(app, "state", None), "audit", None)
    if audit is None:
        return
    principal = (scope.get("state") or {}).get("principal")
    subject = getattr(principal, "subject", "") or ""
    client = scope["client"][0] if scope.get("client") else ""
    path = scope.get("path", "")
    detail = {"method": method, "status": status, "scope": required}
    if status == 403:
        audit.record("auth.forbidden", path, "denied", subject, client, detail, aggregate=True)
    else:
        outcome = "ok" if status < 400 else "failed"
        audit.record("admin.request", path, outcome, subject, client, detail)
