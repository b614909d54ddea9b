"""Uvicorn's request cycle, made cheaper for the event loop in two ways.

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

from typing import Any


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


def cycle_protocol(base: type) -> type:
    """Uvicorn's httptools protocol `base`, whose request cycles are the ones above."""
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    class Cycle(RequestResponseCycle):
        _head = b""  # formatted by uvicorn, not yet written

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

    class CycleProtocol(base):  # type: ignore[misc, valid-type]
        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            if type(cycle) is RequestResponseCycle:
                cycle.__class__ = Cycle  # every request, pipelined ones too
            super()._start_asgi_task(cycle, app)

    return CycleProtocol
