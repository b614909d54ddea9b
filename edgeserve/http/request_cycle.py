"""Uvicorn's request cycle, made cheaper for the event loop in three ways.

**Inference without ASGI.** A POST .../infer whose body has all arrived when its task
starts (a small body comes with its headers) is answered by the cycle itself: the app's
`answer_infer` (edgeserve/http/dispatch.py, the same REST rules as the Starlette route)
returns status, headers and body, written in one `transport.write`. No ASGI messages, no
body-deadline wrapper (no read can wait), no response object, no head captured and
re-framed. Keep-alive, pipelining order, flow control, `Connection: close`, disconnects
and the 500 of a failure are as uvicorn's `send` and `run_asgi` have them. A body still
arriving, `Expect: 100-continue` still waiting, or CORS configured: the ASGI way.

**One write per response.** Uvicorn writes the status line and headers as soon as the
app sends `http.response.start`, then the body with `http.response.body`: two `send(2)`
calls and two TCP segments for every answer, though nearly every answer is one body
message. On two cores the event loop's time per request is time the model does not get,
and the second system call (with the loopback TCP work it starts, counted on the loop's
thread) is a sizeable part of an inference's loop time. The ASGI spec allows this: a
server must not start sending the response until it has received at least one body
message. Here `send` keeps the head uvicorn formats (its checks and framing unchanged)
and writes it with the first body part. A head whose body has no bytes (a HEAD request)
goes out when that body message is sent; an app that fails between the head and the
body gets its connection closed as before, with no partial answer written.

**Says when `receive` would wait.** `receive_would_wait()` is False when the body (or
the disconnect) is already there, so edgeserve/http/body_deadline.py arms no timer for
a read that cannot take the client's time: a small body arrives with its headers.
"""

from __future__ import annotations

import asyncio
from itertools import chain
from typing import Any

from edgeserve.http.headers import SECURITY_HEADERS

_COLON = b": "


class _Capture:
    """Stands in for the transport while uvicorn writes a head: keeps the bytes."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


class _Prefixed:
    """Stands in for the transport while uvicorn sends a body part: its first write
    carries the kept head; everything else is the transport's."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: Any, head: bytes) -> None:
        self.transport = transport
        self.head = head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        self.transport.write(head + data if head else data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def flush(self) -> None:
        if self.head:
            head, self.head = self.head, b""
            self.transport.write(head)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def _nothing() -> None:
    pass


def _tokens(value: bytes) -> list[bytes]:
    """The comma-separated tokens of a header value, as uvicorn reads `Connection`."""
    return [token.lower().strip() for token in value.split(b",")]


def cycle_protocol(base: type) -> type:
    """Uvicorn's httptools protocol `base`, whose request cycles are the ones above
    (`base` makes each cycle with `_new_cycle`, as edgeserve/http/protocol.py's guard does)."""
    from uvicorn.protocols.http.httptools_impl import (
        HEADER_VALUE_RE,
        STATUS_LINE,
        RequestResponseCycle,
    )
    from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

    class Cycle(RequestResponseCycle):
        _head = b""  # formatted by uvicorn, not yet written
        # RequestResponseCycle's fields that start the same for every request: class
        # defaults (uvicorn only ever assigns them), so that a cycle sets only its own
        disconnected = False
        more_body = True
        response_started = False
        response_complete = False
        chunked_encoding: bool | None = None
        expected_content_length = 0
        _body_taken = False  # see `_whole_body`

        def receive_would_wait(self) -> bool:
            """Whether `receive()` would wait for the client now."""
            return not (self.message_event.is_set() or self.disconnected or self.response_complete)

        async def send(self, message: Any) -> None:
            if self.flow.write_paused and not self.disconnected:
                # uvicorn's own wait, done here so that the stand-in transport below is
                # never in place across an await (a concurrent `receive` uses the real one)
                await self.flow.drain()
            if not self.response_started:
                transport = self.transport
                capture = self.transport = _Capture()  # type: ignore[assignment]
                try:
                    await super().send(message)
                finally:
                    self.transport = transport
                self._head = capture.data
                return
            head = self._head
            if not head:
                await super().send(message)
                return
            self._head = b""
            transport = self.transport
            prefixed = self.transport = _Prefixed(transport, head)  # type: ignore[assignment]
            try:
                await super().send(message)
            finally:
                self.transport = transport
                if not self.disconnected:
                    prefixed.flush()  # no body bytes were written (HEAD, an error)

        async def run_asgi(self, app: Any) -> None:
            """An inference whose body is all here is answered without ASGI: the app's
            `answer_infer` gives status, headers and body, written here in one go (one
            coroutine for both ways, not a second one for the direct answer)."""
            answerer = getattr(app, "infer_answerer", None)
            if answerer is None or self.more_body or self.disconnected:
                await super().run_asgi(app)
                return
            scope = self.scope
            target = answerer.infer_target(scope)
            if target is None:
                await super().run_asgi(app)
                return
            status = None
            try:
                # the body is here: handed over without the event, unless uvicorn's
                # `receive` has a 100 Continue to write first
                receive = self.receive if self.waiting_for_100_continue else self._whole_body
                answer = await answerer.answer_infer(scope, receive, *target)
                if self.flow.write_paused and not self.disconnected:
                    await self.flow.drain()
                if not self.disconnected:  # gone: nothing to write, as uvicorn's send
                    self._write(answer)
                status = answer.status
            except BaseException as exc:  # as uvicorn's run_asgi
                self.logger.error("Exception in ASGI application\n", exc_info=exc)
                if not self.response_started:
                    await self.send_500_response()
                else:
                    self.transport.close()
            finally:
                self.on_response = _nothing
                answerer.infer_answered(scope, status)

        async def _whole_body(self) -> Any:
            """`receive` for a body that has all arrived (the parser said so): its one
            message, without waiting on the event as uvicorn's `receive` does; any later
            call is uvicorn's (which waits for the disconnect, the event cleared then:
            only the disconnect or the response can set it again)."""
            if self._body_taken or self.disconnected or self.response_complete:
                if self._body_taken:
                    self.message_event.clear()  # as uvicorn's receive left it
                return await self.receive()
            self._body_taken = True
            if self.flow.read_paused:  # a large body paused reading: as uvicorn's receive
                self.flow.resume_reading()
            body = bytes(self.body)
            self.body = bytearray()
            return {"type": "http.request", "body": body, "more_body": False}

        def _write(self, answer: Any) -> None:
            """Head and body in one write, framed as uvicorn's `send` frames them, with
            the security headers every answer carries (edgeserve/http/answers.py)."""
            self.response_started = True
            self.waiting_for_100_continue = False
            status = answer.status
            # "name: value" per header, joined in C (a comprehension cost ~50 bytecodes)
            lines = list(
                map(_COLON.join, chain(self.default_headers, answer.headers, SECURITY_HEADERS))
            )
            # uvicorn's value check, on all the lines at once: a control character in any
            # of them (names and ": " have none) is one in some value.
            joined = b"\t".join(lines)
            if HEADER_VALUE_RE.search(joined):
                raise RuntimeError("Invalid HTTP header value.")
            closing = False
            if b"connection: " in joined:  # rare (an error's answer): then look closer
                for name, value in answer.headers:
                    if name == b"connection" and b"close" in _tokens(value):
                        self.keep_alive = False
                        closing = True
            body = answer.body
            lines.append(b"content-length: %d" % len(body))
            if not self.keep_alive and not closing:
                lines.append(b"connection: close")
            if self.access_log:
                self.access_logger.info(
                    '%s - "%s %s HTTP/%s" %d',
                    get_client_addr(self.scope),
                    self.scope["method"],
                    get_path_with_query_string(self.scope),
                    self.scope["http_version"],
                    status,
                )
            lines.append(b"")
            self.transport.write(
                b"".join((STATUS_LINE[status], b"\r\n".join(lines), b"\r\n", body))
            )
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    new_cycle = object.__new__

    class CycleProtocol(base):  # type: ignore[misc, valid-type]
        # RequestResponseCycle's fields that are the connection's, the same for each of
        # its requests: made once (see `_new_cycle`)
        _cycle_fields: dict[str, Any]

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._cycle_fields = {
                "transport": self.transport,
                "flow": self.flow,
                "logger": self.logger,
                "access_logger": self.access_logger,
                "access_log": self.access_log,
                "on_response": self.on_response_complete,
            }

        def _new_cycle(self, scope: Any, keep_alive: bool) -> Cycle:
            """Every request's cycle (pipelined ones too), with RequestResponseCycle's
            fields: the connection's copied in C, the request's own set; those every
            request starts with are Cycle's class defaults. (Set one by one in an
            `__init__` they cost ~50 bytecodes a request.)"""
            cycle = new_cycle(Cycle)
            cycle.__dict__ = {
                **self._cycle_fields,
                # uvicorn's server makes a new list each second (the Date header)
                "default_headers": self.server_state.default_headers,
                "scope": scope,
                "keep_alive": keep_alive,
                "waiting_for_100_continue": self.expect_100_continue,
                "message_event": asyncio.Event(),
                "body": bytearray(),
            }
            return cycle

    return CycleProtocol
