"""Refuse inference requests for a model whose queue is full before any other work is done.

Under overload most requests are refused. Refused the ordinary way (routing, auth, body
read, error handler, telemetry record) a refusal cost about three quarters of serving
the small demo model (bench/RESULTS.md), so at 4x capacity refusing alone would take the
whole event loop and accepted requests would wait behind it. This pure-ASGI middleware
answers 429 + Retry-After from a fixed body when the target version's scheduler says it
is full, the same test `protocol/rest.py` makes again after reading the body.

It runs before auth: an overloaded model answers 429 to anyone, which tells no more than
that the model exists. Shed requests leave no telemetry record (writing one per refusal
is part of the cost being saved); the client sees the 429.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Receive, Scope, Send

from edgeserve.errors import EdgeserveError

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
BODY = b'{"error": "the model\'s queue is full; retry later"}'
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"retry-after", b"1"),
]


class ShedMiddleware:
    """429 at once for POST .../infer when that model version's queue is full."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].endswith("/infer") and _full(scope):
            await send({"type": "http.response.start", "status": 429, "headers": list(HEADERS)})
            await send({"type": "http.response.body", "body": BODY})
            return
        await self.app(scope, receive, send)


def _full(scope: Scope) -> bool:
    match = INFER_PATH.fullmatch(scope["path"])
    if match is None or scope.get("method") != "POST":
        return False
    registry = getattr(getattr(scope.get("app"), "state", None), "registry", None)
    if registry is None:
        return False
    try:
        model = registry.get(match.group(1), match.group(2))
    except EdgeserveError:  # unknown or loading: the endpoint gives the proper answer
        return False
    return bool(getattr(model.scheduler, "full", False))
