"""Refuse inference requests before any other work is done: when the model's queue is
full, or when the event loop is too late to answer more.

Under overload most requests are refused. Refused the ordinary way (routing, auth, body
read, error handler, telemetry record) a refusal cost about three quarters of serving
the small demo model (bench/RESULTS.md), so at 4x capacity refusing alone would take the
whole event loop and accepted requests would wait behind it. This pure-ASGI middleware
answers 429 + Retry-After from a fixed body when the target version's scheduler says it
is full (the same test `serving/pipeline.py` makes again before decoding), or when
the loop's lag monitor (edgeserve/serving/admission.py) refuses its share of newcomers.

It runs before auth: an overloaded model answers 429 to anyone, which tells no more than
that the model exists. Shed requests leave no telemetry record (writing one per refusal
is part of the cost being saved); the client sees the 429.
"""

from __future__ import annotations

import json
import re

from starlette.types import ASGIApp, Receive, Scope, Send

from edgeserve.errors import EdgeserveError
from edgeserve.http.headers import SECURITY_HEADERS
from edgeserve.protocol.integers import parse_uint
from edgeserve.serving.admission import SERVER_BUSY_MESSAGE

# Set in an infer request's ASGI scope once the parser has made the shed test, so that
# edgeserve/http/dispatch.py does not make it again a few microseconds later: the
# (model, version or None) its path names, which dispatch then need not match again.
SHED_TESTED = "edgeserve.shed_tested"
# The loop gate that admitted the request, kept in its scope until `leave` says it is
# answered (the gate keeps a few requests in flight whatever the loop's lateness).
ADMITTED_BY = "edgeserve.admitted_by"
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


def infer_path_target(scope: Scope) -> tuple[str, str | None] | None:
    """The (model, version or None) a POST .../infer names in its routed path, else None:
    what the parser's shed test, the shed middleware and the direct dispatch each ask."""
    if scope["method"] != "POST":
        return None
    match = INFER_PATH.fullmatch(scope["path"])
    return None if match is None else match.groups()  # type: ignore[return-value]


MODEL_FULL = b'{"error": "the model\'s queue is full; retry later"}'
SERVER_BUSY = json.dumps({"error": SERVER_BUSY_MESSAGE}).encode()


def headers_for(body: bytes) -> list[tuple[bytes, bytes]]:
    """The headers of a shed request's 429 with `body`."""
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        *SECURITY_HEADERS,  # the parser-level 429 never passes HeaderGuard
    ]


class ShedMiddleware:
    """429 at once for POST .../infer when that model version's queue is full, or the
    event loop is refusing its share of newcomers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get(SHED_TESTED):
            target = infer_path_target(scope)
            body = None if target is None else shed(*target, scope.get("app"), scope)
            if body is not None:
                await send_shed(send, body)
                return
        try:
            await self.app(scope, receive, send)
        finally:
            leave(scope)


async def send_shed(send: Send, body: bytes) -> None:
    """The 429 + Retry-After of a shed request, as ASGI messages."""
    await send({"type": "http.response.start", "status": 429, "headers": headers_for(body)})
    await send({"type": "http.response.body", "body": body})


def shed(name: str, version: str | None, app: object, scope: Scope) -> bytes | None:
    """The body of the 429 that refuses a POST .../infer for model `name` (and `version`,
    as INFER_PATH reads them from the path) now, or None to let it in.

    Only requests for a loaded model version are refused here (anything else gets the
    endpoint's proper answer), and each refusal is counted in that version's stats,
    since shed requests leave no telemetry record. Called once per request: the loop's
    gate spends its admission credit on each call, and what it admits is marked in
    `scope` for `leave` once answered.
    """
    state = getattr(app, "state", None)
    registry = getattr(state, "registry", None)
    if registry is None or ADMITTED_BY in scope:
        return None
    if version is not None and parse_uint(version) is None:
        return None  # not a version number: the endpoint answers 404
    try:
        model = registry.get(name, version)
    except EdgeserveError:  # unknown or loading: the endpoint gives the proper answer
        return None
    if getattr(model.scheduler, "full", False):
        body = MODEL_FULL
    else:
        gate = getattr(state, "loop_gate", None)
        if gate is None:
            return None
        if gate.admit():
            scope[ADMITTED_BY] = gate
            return None
        body = SERVER_BUSY
    stats = getattr(model, "stats", None)
    if stats is not None:
        stats.shed += 1
    return body


def leave(scope: Scope) -> None:
    """Tell the gate that admitted this request (if one did) that it is answered; safe
    to call more than once."""
    gate = scope.pop(ADMITTED_BY, None)
    if gate is not None:
        gate.leave()


def shedding_protocol(base: type) -> type:
    """Edgeserve's httptools protocol `base` (edgeserve/http/protocol.py's parser guard, which asks
    `_answer_from_parser` once a head is read), answering the same 429s without any ASGI.

    The middleware above still costs a request task, the Starlette call and the outer
    middlewares: about a third of serving the small model. Here the refusal is written
    from the parser callbacks (no task, no scope handed to the app), several times
    cheaper, which is what lets the event loop refuse 4x its serving capacity. Only a
    POST .../infer with no earlier response pending on the connection, no
    `Expect: 100-continue` and no `Upgrade` is shed; everything else takes the normal
    way.
    """
    canned = {
        body: b"HTTP/1.1 429 Too Many Requests\r\n"
        + b"".join(k + b": " + v + b"\r\n" for k, v in headers_for(body))
        + b"\r\n"
        + body
        for body in (MODEL_FULL, SERVER_BUSY)
    }

    class SheddingProtocol(base):  # type: ignore[misc, valid-type]
        def _answer_from_parser(self) -> bytes | None:
            """Called by edgeserve/http/protocol.py's parser guard once the request's head is read
            (method, path and headers in its scope): the canned 429 when it is shed."""
            scope = self.scope
            if (
                (target := infer_path_target(scope)) is not None  # the path the app will route
                and (self.cycle is None or self.cycle.response_complete)
                and not self.expect_100_continue
                and not self.parser.should_upgrade()  # uvicorn may never call the app
            ):
                body = shed(*target, self.app, scope)
                if body is not None:
                    return canned[body]
                scope[SHED_TESTED] = target  # type: ignore[literal-required]
            return None

    return SheddingProtocol
