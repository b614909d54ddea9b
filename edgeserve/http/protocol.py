"""Edgeserve's HTTP/1.1 protocol for `[server] engine = "uvicorn"`: uvicorn's httptools
protocol with its parser callbacks written in, so that each request pays for one call per
callback, plus the defences uvicorn lacks (head-bytes cap, read and head deadlines,
connection caps), the overloaded model's 429 from the parser (edgeserve/http/shedding.py)
and request cycles that answer an inference without ASGI (edgeserve/http/request_cycle.py).

The callbacks written in follow uvicorn 0.55's `httptools_impl.py` (pyproject.toml pins
uvicorn below 0.56): raise that bound only after comparing them with the new release.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
from itertools import chain
from operator import itemgetter, methodcaller
from typing import Any, NoReturn

from edgeserve.config.loader import Settings
from edgeserve.http.bounds import CONNECTIONS, CONNECTIONS_PER_CLIENT, HEADER_BYTES, BoundsHit

log = logging.getLogger(__name__)

# Descriptors kept free of client connections for the process's own files (models,
# SQLite, logs, gRPC): the connection cap stays this far below `ulimit -n`.
FD_RESERVE = 64
_BUSY_BODY = b'{"error": "too many open connections; retry later"}'
REFUSED_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
    + str(len(_BUSY_BODY)).encode()
    + b"\r\n\r\n"
    + _BUSY_BODY
)


def connection_cap(requested: int) -> int:
    """`requested`, lowered to keep FD_RESERVE descriptors below the open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft - FD_RESERVE))


class _HeadersTooLarge(Exception):
    pass


# Where a chunked body is, for its trailers (`GuardedHttpTools._trailing`): in no chunk or
# in a chunk's data; a chunk's size line read in this read and none of its data yet (the
# last chunk's, if trailers follow); and no data in the reads since, so it was the last
# chunk and every read now, to the body's end, is trailer bytes.
_NO_TRAILERS = 0
_CHUNK_SIZE_READ = 1
_TRAILERS = 2

_name = itemgetter(0)
_value = itemgetter(1)
_rstrip_ows = methodcaller("rstrip", b" \t")


def _head_bytes(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    """The bytes a request head counts against `max_header_bytes`: its URL, and each
    header's name and value plus 4 (": " and CRLF). Summed in C, once per head: counted
    in `on_header` it cost ~33 bytecodes a header."""
    return len(url) + sum(map(len, chain.from_iterable(headers))) + 4 * len(headers)


def guarded_httptools(settings: Settings, bounds: BoundsHit) -> type:
    """Uvicorn's httptools protocol plus Hypercorn's two defences: a cap on request-head
    bytes (431) and `read_timeout_s` of silence while a request is arriving (or before the
    first one) closes the connection; and one neither has: a request's line and headers
    must be complete within `request_head_timeout_s` of its first byte, so a client
    trickling a byte just inside the read timeout cannot hold a connection for long;
    and caps on open connections, per client address (503 and close) and in all (the
    longest-idle connection is closed for a newcomer; 503 when none is idle)."""
    import urllib.parse

    import httptools
    from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT, service_unavailable
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

    from edgeserve.http.request_cycle import cycle_protocol
    from edgeserve.http.shedding import shedding_protocol

    max_head_bytes = settings.limits.max_header_bytes
    read_timeout_s = settings.server.read_timeout_s
    head_timeout_s = settings.server.request_head_timeout_s
    first_timeout_s = min(read_timeout_s, head_timeout_s)  # the earlier of a request's two
    max_total = connection_cap(settings.server.max_connections)
    max_per_client = settings.server.max_connections_per_client
    log.info("connection caps total=%d per_client=%d", max_total, max_per_client)
    open_by_client: dict[str, int] = {}  # client address -> open connections (no zeros)
    open_total = [0]
    # Connections between requests or still waiting for a request's head, oldest first:
    # the ones a newcomer may displace when the total cap is reached.
    idle: dict[Any, None] = {}

    class GuardedHttpTools(HttpToolsProtocol):
        _too_large = False
        # A head still arriving after a read: the headers list counted so far (its
        # count, their bytes), so that a head trickled in is summed once, not per read
        _counted: tuple[list, int, int] = ([], 0, 0)
        _head_count = 0  # headers of the request's complete head (trailers come after)
        # bytes of the reads after the first of a head still arriving; once the last chunk
        # of a body is read, the head's and trailers' bytes and the trailer reads after it
        _head_raw = 0
        _head_total = 0  # the bytes a head, and any trailers so far, count to the cap
        _trailing = _NO_TRAILERS  # where a chunked body is, for its trailers (see above)
        # Deadlines (loop time, 0 = off) checked by one lazy timer per connection: arming
        # a deadline is a float store. A timer per deadline and request (call_later and
        # cancel each time) took a quarter of the event loop at 4x overload, with
        # thousands of connections in the timer heap.
        _read_deadline = 0.0  # the next bytes of a request must arrive by then
        _head_deadline = 0.0  # the request's line and headers must be complete by then
        # An idle keep-alive connection is closed then: uvicorn's keep-alive timeout,
        # which armed a timer after every response and cancelled it on the next bytes.
        _idle_deadline = 0.0
        _deadline_timer: asyncio.TimerHandle | None = None
        _timer_at = math.inf  # when the timer fires (inf: none pending); see `_check_by`
        _counted_as: str | None = None  # the client address this connection is counted under
        _parser_answer: bytes | None = None  # see `_answer_from_parser`

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            # what each request's scope starts with on this connection (on_message_begin);
            # its "asgi" dict is shared by the connection's scopes (uvicorn makes one per
            # request; nothing writes to it)
            self._scope_base = {
                "type": "http",
                "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
                "http_version": "1.1",
                "server": self.server,
                "client": self.client,
                "scheme": self.scheme,
                "root_path": self.root_path,
            }
            address = self.client[0] if self.client else ""
            held = open_by_client.get(address, 0)
            if held >= max_per_client:
                self._refuse(CONNECTIONS_PER_CLIENT)
                return
            if open_total[0] >= max_total:
                if not idle:
                    self._refuse(CONNECTIONS)
                    return
                # As nginx reuses idle keep-alive connections: the one idle longest (or
                # still waiting for its request head) makes room, so slow sockets cannot
                # lock newcomers such as health checks out.
                bounds.hit(CONNECTIONS)
                victim = next(iter(idle))
                victim._release()
                victim.transport.close()
            open_total[0] += 1
            open_by_client[address] = held + 1
            self._counted_as = address
            idle[self] = None
            self._arm()

        def _refuse(self, bound: str) -> None:
            bounds.hit(bound)
            self.transport.write(REFUSED_BUSY)
            self.transport.close()

        def on_response_complete(self) -> None:
            """Uvicorn's, with its keep-alive timer one of this connection's deadlines."""
            self.server_state.total_requests += 1
            if self.transport.is_closing():
                return
            if self.flow.read_paused:  # uvicorn's resume_reading, its test written out
                self.flow.resume_reading()
            if self.pipeline:  # the next pipelined request starts
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            else:
                self._idle_deadline = when = self.loop.time() + self.timeout_keep_alive
                if when < self._timer_at:
                    self._check_by(when)
            if self._counted_as is not None:
                idle[self] = None  # last in the eviction order: idle since now

        def _release(self) -> None:
            address = self._counted_as
            if address is None:
                return
            self._counted_as = None
            idle.pop(self, None)
            open_total[0] -= 1
            left = open_by_client[address] - 1
            if left:
                open_by_client[address] = left
            else:
                del open_by_client[address]

        def handle_websocket_upgrade(self) -> None:
            """The WebSocket protocol takes the transport over (and gets its
            `connection_lost`): the connection is released when it ends."""
            idle.pop(self, None)
            super().handle_websocket_upgrade()
            upgraded = self.transport.get_protocol()
            lost = upgraded.connection_lost
            release = self._release

            def connection_lost(exc: Exception | None) -> None:
                release()
                lost(exc)

            upgraded.connection_lost = connection_lost  # type: ignore[method-assign]

        def connection_lost(self, exc: Exception | None) -> None:
            self._release()
            self._read_deadline = self._head_deadline = self._idle_deadline = 0.0
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
                self._deadline_timer = None
                self._timer_at = math.inf
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._idle_deadline = 0.0  # as uvicorn cancels its keep-alive timer
            if self._read_deadline:  # a request is arriving: the clock restarts
                self._read_deadline = self.loop.time() + read_timeout_s
            arriving = self.headers if self._head_deadline else None  # an unfinished head
            try:  # uvicorn's, written in
                self.parser.feed_data(data)
                if self._head_deadline:  # a head is still arriving: within the cap so far?
                    if self.headers is arriving:  # the same head: all this read was its
                        self._head_raw += len(data)
                    self._partial_head_fits()
                elif self._trailing:  # the body's last chunk may have been read
                    self._trailers_arriving(len(data))
            except (httptools.HttpParserError, _HeadersTooLarge):
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()

        def on_message_begin(self) -> None:
            # uvicorn's written in (as the other parser callbacks: a call less per request),
            # the scope's fields that are the connection's copied in C
            self.url = b""
            self.expect_100_continue = False
            self.headers = []
            self._idle_deadline = 0.0  # a request is arriving (one pipelined after a shed 429)
            self._head_raw = 0
            self.scope = {
                **self._scope_base,  # type: ignore[typeddict-item]
                "headers": self.headers,
                "state": self.app_state.copy(),
            }
            now = self.loop.time()
            self._read_deadline = now + read_timeout_s
            self._head_deadline = now + head_timeout_s
            if now + first_timeout_s < self._timer_at:
                self._check_by(now + first_timeout_s)

        def on_headers_complete(self) -> None:
            """Uvicorn's, written in, making a `_new_cycle` and starting its task."""
            self._headers_read()
            idle.pop(self, None)  # a request is being served: not evicted for a newcomer
            self._head_deadline = 0.0
            parser = self.parser
            http_version = parser.get_http_version()
            scope = self.scope
            scope["method"] = parser.get_method().decode("ascii")
            if http_version != "1.1":
                scope["http_version"] = http_version
            if parser.should_upgrade() and self._should_upgrade():
                return
            parsed_url = httptools.parse_url(self.url)
            raw_path = parsed_url.path
            path = raw_path.decode("ascii")
            if "%" in path:
                path = urllib.parse.unquote(path)
            root = self.root_path
            scope["path"] = root + path if root else path
            scope["raw_path"] = root.encode("ascii") + raw_path if root else raw_path
            scope["query_string"] = parsed_url.query or b""
            answer = self._answer_from_parser()
            if answer is not None:  # written once the body is read; no cycle, no task
                self._parser_answer = answer
                return
            limit = self.limit_concurrency
            if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
                app = service_unavailable
                self.logger.warning("Exceeded concurrency limit.")
            else:
                app = self.app
            existing = self.cycle
            keep_alive = http_version != "1.0" and parser.should_keep_alive()
            self.cycle = cycle = self._new_cycle(scope, keep_alive)
            if existing is None or existing.response_complete:
                self._start_asgi_task(cycle, app)
            else:  # pipelined: queued until the answers before it are written
                self.flow.pause_reading()
                self.pipeline.appendleft((cycle, app))

        def _headers_read(self) -> None:
            """What uvicorn's on_header does to each header, done for them all at once in
            C: names lower-cased, trailing whitespace off values (llhttp keeps it; RFC 9110
            5.5 excludes it), `Expect: 100-continue` noted; and the head-bytes cap."""
            headers = self.headers
            self._head_total = _head_bytes(self.url, headers)
            if self._head_total > max_head_bytes:
                self._refuse_head()  # httptools turns this into a parser error: 431
            self._head_count = len(headers)
            headers[:] = zip(
                map(bytes.lower, map(_name, headers)),
                map(_rstrip_ows, map(_value, headers)),
                strict=True,
            )
            if b"expect" in map(_name, headers):
                for name, value in headers:
                    if name == b"expect" and value.lower() == b"100-continue":
                        self.expect_100_continue = True

        def _trailers_fit(self) -> None:
            """Trailer fields of a chunked body, which the parser passes on as headers
            after the head (into the same list): normalised as the head's are, and held
            to the same cap together with it (431)."""
            headers = self.headers
            n = self._head_count
            self._head_total += _head_bytes(b"", headers[n:])
            if self._head_total > max_head_bytes:
                self._refuse_head()
            headers[n:] = [(name.lower(), _rstrip_ows(value)) for name, value in headers[n:]]
            self._head_count = len(headers)

        def _trailers_arriving(self, read_bytes: int) -> None:
            """Refuse trailers still arriving once over the cap with the head (431): the
            fields complete so far, and the reads after the last chunk's counted whole, as
            the parser holds the field it is reading until its CRLF, so one endless value
            is in no field yet."""
            if self._trailing == _TRAILERS:  # all this read was trailer bytes
                self._head_raw += read_bytes
                if self._head_raw > max_head_bytes:
                    self._refuse_head()  # answered 431 by `data_received`
            if len(self.headers) > self._head_count:
                self._trailers_fit()
            if self._trailing == _CHUNK_SIZE_READ:  # the next read tells: data or trailers
                self._trailing = _TRAILERS
                self._head_raw = self._head_total

        def on_chunk_header(self) -> None:
            # A chunk's size line, read: httptools does not pass the size on, so whether it
            # was the last chunk (0, trailers next) shows only in what the next read brings.
            self._trailing = _CHUNK_SIZE_READ

        def on_chunk_complete(self) -> None:
            # a chunk's data ended, or the last chunk's trailers (the message ends next)
            self._trailing = _NO_TRAILERS

        def _new_cycle(self, scope: Any, keep_alive: bool) -> Any:
            """The request's cycle, as uvicorn makes it (edgeserve/http/request_cycle.py
            makes its own)."""
            return RequestResponseCycle(
                scope=scope,
                transport=self.transport,
                flow=self.flow,
                logger=self.logger,
                access_logger=self.access_logger,
                access_log=self.access_log,
                default_headers=self.server_state.default_headers,
                message_event=asyncio.Event(),
                expect_100_continue=self.expect_100_continue,
                keep_alive=keep_alive,
                on_response=self.on_response_complete,
            )

        def _answer_from_parser(self) -> bytes | None:
            """A whole response for the request whose head was just read, to be written
            from the parser once its body is read (edgeserve/http/shedding.py's 429s);
            None to have the app answer it."""
            return None

        def on_header(self, name: bytes, value: bytes) -> None:
            # Uvicorn's own on_header is done for all headers at once by `_headers_read`,
            # and the head-bytes cap there (a whole head) or by `_partial_head_fits`.
            self.headers.append((name, value))

        def _refuse_head(self) -> NoReturn:
            """A head (or its trailers) past the cap: 431, not the parser error's 400."""
            self._too_large = True
            raise _HeadersTooLarge

        def _partial_head_fits(self) -> None:
            """Refuse a head still arriving once what has arrived of it is over the cap
            (a complete head is held to it by `_headers_read`). A head nearly always comes
            in one read; a trickled one has only its new headers summed each time, and the
            reads after its first are counted whole: the parser holds the header it is
            reading until the next begins, so one endless value is in no header yet."""
            if self._head_raw > max_head_bytes:
                self._refuse_head()
            headers = self.headers
            counted, n, total = self._counted
            if counted is not headers:  # the first read that ends inside this head
                n = total = 0
            total += _head_bytes(b"", headers[n:])
            self._counted = (headers, len(headers), total)
            if len(self.url) + total > max_head_bytes:
                self._refuse_head()  # answered 431 by `data_received`

        def on_body(self, body: bytes) -> None:
            # uvicorn's written in, with the body of a request answered from the parser
            # dropped unread; data of a chunk: not the last one, no trailers yet
            self._trailing = _NO_TRAILERS
            if self._parser_answer is not None:
                return
            if (self.parser.should_upgrade() and self._should_upgrade()) or (
                self.cycle.response_complete  # (no cycle is made for an upgrade)
            ):
                return
            cycle = self.cycle
            cycle.body += body
            if len(cycle.body) > HIGH_WATER_LIMIT:
                self.flow.pause_reading()
            cycle.message_event.set()

        def on_message_complete(self) -> None:
            # uvicorn's written in, and the answer of a request answered from the parser
            self._read_deadline = 0.0
            if len(self.headers) > self._head_count:  # trailers came with the body's end
                self._trailers_fit()
            answer = self._parser_answer
            if answer is not None:
                self._parser_answer = None
                self.transport.write(answer)
                if self.parser.should_keep_alive():
                    self.on_response_complete()  # keep-alive, flow control, counters
                else:
                    self.transport.close()
                return
            if (self.parser.should_upgrade() and self._should_upgrade()) or (
                self.cycle.response_complete
            ):
                return
            self.cycle.more_body = False
            self.cycle.message_event.set()

        def send_400_response(self, msg: str) -> None:
            if not self._too_large:
                return super().send_400_response(msg)
            bounds.hit(HEADER_BYTES)
            body = b'{"error": "request headers are too large"}'
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            self.transport.close()

        def _arm(self) -> None:
            self._read_deadline = self.loop.time() + read_timeout_s
            if self._read_deadline < self._timer_at:
                self._check_by(self._read_deadline)

        def _check_by(self, when: float) -> None:
            """Have the timer fire at `when`, earlier than the one pending (if any): the
            callers compare with `_timer_at` first, as each request arms two deadlines
            that an earlier timer already covers."""
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            self._deadline_timer = self.loop.call_at(when, self._check_deadlines)
            self._timer_at = when

        def _check_deadlines(self) -> None:
            self._deadline_timer = None
            self._timer_at = math.inf
            now = self.loop.time()
            if self._head_deadline and now >= self._head_deadline:
                self._cut_off(
                    "request head not complete after %ss; connection closed", head_timeout_s
                )
            elif self._read_deadline and now >= self._read_deadline:
                self._cut_off("slow client disconnected after read_timeout_s=%s", read_timeout_s)
            elif self._idle_deadline and now >= self._idle_deadline:
                self.timeout_keep_alive_handler()  # uvicorn's: closed without a log line
            else:  # deadlines moved on (or ended) since the timer was set
                deadlines = (self._read_deadline, self._head_deadline, self._idle_deadline)
                pending = [d for d in deadlines if d]
                if pending:
                    self._check_by(min(pending))  # none is pending: the timer just fired

        def _cut_off(self, message: str, limit_s: float) -> None:
            """Close a connection whose client took too long (either deadline)."""
            if not self.transport.is_closing():
                log.info(message, limit_s)
                self.transport.close()

    # A full model's 429s skip the ASGI stack; every other answer is one write.
    return cycle_protocol(shedding_protocol(GuardedHttpTools))
