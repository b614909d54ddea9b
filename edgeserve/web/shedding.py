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
from edgeserve.web.headers import SECURITY_HEADERS

# Set in an infer request's ASGI scope once the parser has made the shed test, so that
# edgeserve/web/infer_dispatch.py does not make it again a few microseconds later.
SHED_TESTED = "edgeserve.shed_tested"
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
BODY = b'{"error": "the model\'s queue is full; retry later"}'
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"retry-after", b"1"),
    *SECURITY_HEADERS,  # the parser-level 429 never passes HeaderGuard
]


class ShedMiddleware:
    """429 at once for POST .../infer when that model version's queue is full."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].endswith("/infer")
            and scope.get("method") == "POST"
            and shed(scope["path"], scope.get("app"))
        ):
            await send_shed(send)
            return
        await self.app(scope, receive, send)


async def send_shed(send: Send) -> None:
    """The 429 + Retry-After of a shed request, as ASGI messages."""
    await send({"type": "http.response.start", "status": 429, "headers": list(HEADERS)})
    await send({"type": "http.response.body", "body": BODY})


def shed(path: str, app: object) -> bool:
    """Whether a POST to `path` is refused now; a refusal is counted in the model's stats,
    since shed requests leave no telemetry record."""
    model = _full_model(path, app)
    if model is None:
        return False
    stats = getattr(model, "stats", None)
    if stats is not None:
        stats.shed += 1
    return True


def _full_model(path: str, app: object) -> object | None:
    """The model version an infer `path` names, when its queue is full; else None."""
    match = INFER_PATH.fullmatch(path)
    registry = getattr(getattr(app, "state", None), "registry", None)
    if match is None or registry is None:
        return None
    try:
        model = registry.get(match.group(1), match.group(2))
    except EdgeserveError:  # unknown or loading: the endpoint gives the proper answer
        return None
    return model if getattr(model.scheduler, "full", False) else None


def shedding_protocol(base: type) -> type:
    """Uvicorn's httptools protocol `base`, answering the same 429 without any ASGI work.

    The middleware above still costs a request task, the Starlette call and the outer
    middlewares: about a third of serving the small model. Here the refusal is written
    from the parser callbacks (no task, no scope handed to the app), several times
    cheaper, which is what lets the event loop refuse 4x its serving capacity. Only a
    POST .../infer with no earlier response pending on the connection and no
    `Expect: 100-continue` is shed; everything else takes the normal way.
    """
    canned = (
        b"HTTP/1.1 429 Too Many Requests\r\n"
        + b"".join(k + b": " + v + b"\r\n" for k, v in HEADERS)
        + b"\r\n"
        + BODY
    )

    class SheddingProtocol(base):  # type: ignore[misc, valid-type]
        _shedding = False

        def on_headers_complete(self) -> None:
            if (
                self.url.endswith(b"/infer")
                and (self.cycle is None or self.cycle.response_complete)
                and not self.expect_100_continue
                and self.parser.get_method() == b"POST"
            ):
                if shed(self.url.split(b"?", 1)[0].decode("latin-1"), self.app):
                    self._shedding = True
                    head_done = getattr(self, "_head_done", None)  # server.py's head deadline
                    if head_done is not None:
                        head_done()
                    return
                if b"%" not in self.url:  # the path tested is the one the app will route
                    self.scope[SHED_TESTED] = True  # type: ignore[literal-required]
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._shedding:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._shedding:
                super().on_message_complete()
                return
            self._shedding = False
            disarm = getattr(self, "_disarm", None)  # server.py's read-timeout guard
            if disarm is not None:
                disarm()
            self.transport.write(canned)
            if self.parser.should_keep_alive():
                self.on_response_complete()  # keep-alive timer, flow control, counters
            else:
                self.transport.close()

    return SheddingProtocol
