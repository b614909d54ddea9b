"""A deadline on every request body, with a minimum data rate (slowloris on the body).

`read_timeout_s` only bounds the silence between two packets, so a client that sends a
byte every few seconds could hold a request, and its connection, for as long as it
liked. This pure-ASGI middleware gives each body a deadline that moves with the data:
`body_rate_grace_s` plus one second per `min_body_bytes_per_s` received, never more
than `body_timeout_s` (as Kestrel's MinRequestBodyDataRate). A body that misses it is
refused with 408 and the connection is closed, whatever route was reading it. Only the
time the application spends waiting inside `receive` counts: a route that is slow to
read (auth first, a disk write per chunk) does not use up the client's allowance, and a
read that cannot wait (the body is already there, as uvicorn's request cycle can tell:
edgeserve/http/request_cycle.py) arms no timer at all.
"""

from __future__ import annotations

import asyncio
import sys

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgeserve.errors import EdgeserveError
from edgeserve.http.bounds import BODY_DEADLINE, BoundsHit

if sys.version_info >= (3, 11):

    async def _receive_by(receive: Receive, deadline: float) -> Message:
        async with asyncio.timeout_at(deadline):  # one timer, no extra task
            return await receive()

else:  # pragma: no cover

    async def _receive_by(receive: Receive, deadline: float) -> Message:
        remaining = deadline - asyncio.get_running_loop().time()
        return await asyncio.wait_for(receive(), max(0.0, remaining))


class BodyTooSlow(EdgeserveError):
    """The body did not arrive in time; the connection is closed with the answer."""

    status = 408

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"connection": "close"})


class BodyDeadline:
    """Wrap `receive` so that each body read waits no later than the body's deadline."""

    def __init__(
        self,
        app: ASGIApp,
        bounds: BoundsHit,
        *,
        timeout_s: float,
        grace_s: float,
        min_bytes_per_s: int,
    ) -> None:
        self.app = app
        # The parser-level shedding (edgeserve/http/shedding.py) finds the registry and
        # the loop gate on the served app's state: this wrapper is the served app.
        self.state = getattr(app, "state", None)
        # Uvicorn's protocol answers an inference whose body has all arrived without ASGI
        # (edgeserve/http/request_cycle.py): no read waits, so no deadline is needed.
        self.infer_answerer = getattr(app, "infer_answerer", None)
        self.bounds = bounds
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.min_bytes_per_s = min_bytes_per_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        waited = 0.0  # seconds spent inside `receive`: the client's time, not the app's
        received = 0
        complete = False
        timed_out = False
        # uvicorn's cycle (edgeserve/http/request_cycle.py) says when a read cannot wait:
        # then no timer is armed (a small body arrives with the request's headers).
        would_wait = getattr(getattr(receive, "__self__", None), "receive_would_wait", None)

        async def timed_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body only a disconnect can come: not bounded here
                return await receive()
            if would_wait is not None and not would_wait():
                message = await receive()  # already there: none of the client's time
            else:
                message = await receive_in_time()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
            return message

        async def receive_in_time() -> Message:
            nonlocal waited, timed_out
            loop = asyncio.get_running_loop()
            allowed = self.timeout_s
            if self.min_bytes_per_s:
                allowed = min(allowed, self.grace_s + received / self.min_bytes_per_s)
            began = loop.time()
            try:
                return await _receive_by(receive, began + allowed - waited)
            except asyncio.TimeoutError:
                timed_out = True
                self.bounds.hit(BODY_DEADLINE)
                raise BodyTooSlow(
                    f"request body too slow: {received} bytes received in "
                    f"{waited + loop.time() - began:.0f}s (at least {self.min_bytes_per_s} "
                    f"bytes/s after {self.grace_s:g}s, all within {self.timeout_s:g}s)"
                ) from None
            finally:
                waited += loop.time() - began

        async def closing_send(message: Message) -> None:
            # A route may answer a refused body its own way: the connection still closes,
            # or the rest of the slow body would be read as the next request.
            if timed_out and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, timed_receive, closing_send)
