"""Run the application under Hypercorn, owning signals so shutdown drains cleanly.

SIGTERM/SIGINT stop accepting, let in-flight requests finish (graceful_timeout_s),
then run the lifespan shutdown. SIGHUP reloads the model repository without dropping
requests.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from operator import itemgetter, methodcaller
from typing import Any

import psutil
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette

from edgeserve.app import build_app
from edgeserve.config.loader import ConfigError, Settings
from edgeserve.http.body_deadline import BodyDeadline
from edgeserve.http.bounds import CONNECTIONS, CONNECTIONS_PER_CLIENT, BoundsHit
from edgeserve.process import systemd_notify

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

# TLS 1.2 suites: forward-secret key exchange and AEAD only (1.3's suites all are). ChaCha20
# for ARM boxes without AES instructions.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"


def harden_tls(context: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2+ only, sane ciphers, no compression or renegotiation; for both engines."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


class _HardenedConfig(HypercornConfig):
    def create_ssl_context(self) -> ssl.SSLContext | None:
        context = super().create_ssl_context()
        return harden_tls(context) if context is not None else None


def hypercorn_config(settings: Settings, listener: socket.socket | None = None) -> HypercornConfig:
    """Hypercorn settings from ours; its defaults (no read timeout, Server header) are not.
    With `listener` it serves that socket rather than binding [server] host and port;
    Hypercorn then owns (and closes) its descriptor, so the socket object is detached."""
    s = settings.server
    config = _HardenedConfig()
    host = f"[{s.host}]" if ":" in s.host else s.host
    config.bind = [f"fd://{listener.detach()}" if listener else f"{host}:{s.port}"]
    config.keep_alive_timeout = s.keep_alive_timeout_s
    config.read_timeout = int(max(1, s.read_timeout_s))
    config.graceful_timeout = s.graceful_timeout_s
    config.include_server_header = False
    config.h11_max_incomplete_size = settings.limits.max_header_bytes
    config.h2_max_header_list_size = settings.limits.max_header_bytes
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.ssl_handshake_timeout = s.tls_handshake_timeout_s
    if s.tls_cert is not None and s.tls_key is not None:
        config.certfile = str(s.tls_cert)
        config.keyfile = str(s.tls_key)
        if s.tls_client_ca is not None:
            config.ca_certs = str(s.tls_client_ca)
            config.verify_mode = ssl.CERT_REQUIRED
    return config


def event_loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """`uvloop.run` or `asyncio.run`: libuv's loop spends less CPU per request, which
    on two cores is CPU the model gets back (bench/RESULTS.md)."""
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "server.event_loop", '"uvloop" but uvloop is not installed (pip install uvloop)'
            ) from None
        return asyncio.run
    return uvloop.run


def build_served_app(settings: Settings) -> tuple[Starlette, BodyDeadline, BoundsHit]:
    """The application, the ASGI app the engine serves (the app behind the body deadline)
    and the bounds counter they share: what `run_server` serves, for whatever else must
    serve it the same way (bench/loopops.py)."""
    app = build_app(settings)
    bounds = BoundsHit()
    app.state.bounds = bounds  # exported by the telemetry metrics (edgeserve/app.py)
    limits = settings.limits
    served = BodyDeadline(
        app,
        bounds,
        timeout_s=limits.body_timeout_s,
        grace_s=limits.body_rate_grace_s,
        min_bytes_per_s=limits.min_body_bytes_per_s,
    )
    return app, served, bounds


async def run_server(settings: Settings, listener: socket.socket | None = None) -> None:
    """Serve on `listener` (bound by `edgeserve serve` before it wrote anything; else
    bound here) until SIGTERM or SIGINT."""
    if listener is None:
        from edgeserve.cli.preflight import open_listener

        listener = open_listener(settings.server.host, settings.server.port)
    port = listener.getsockname()[1]  # the kernel's choice when [server] port = 0
    app, served, bounds = build_served_app(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloading: set[asyncio.Task] = set()

    def on_hangup() -> None:
        reload = getattr(app.state, "reload", None)
        if reload is None or reloading:
            log.info("reload skipped reason=%s", "starting" if reload is None else "in progress")
            return
        systemd_notify.reloading()
        task = asyncio.ensure_future(reload())
        reloading.add(task)
        task.add_done_callback(reloading.discard)
        task.add_done_callback(lambda _: systemd_notify.ready("reloaded"))

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    scheme = "https" if settings.server.tls_cert else "http"
    log.info("listening url=%s://%s:%s", scheme, settings.server.host, port)
    watchdog = asyncio.ensure_future(systemd_notify.run_watchdog())
    announce = asyncio.ensure_future(_announce_ready(app, settings, port))
    try:
        if settings.server.engine == "uvicorn":
            await serve_uvicorn(served, settings, stop, bounds, listener)
        else:
            config = hypercorn_config(settings, listener)
            await serve(served, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    finally:
        announce.cancel()
        watchdog.cancel()
    log.info("stopped")


async def _announce_ready(app: object, settings: Settings, port: int) -> None:
    """READY=1 once the port accepts connections and model loading has finished, and one
    `ready` line with the URL, the models and the seconds since the process started."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.server.host, settings.server.host)
    while True:
        loading = getattr(app.state, "loading", None)  # type: ignore[attr-defined]
        # the ready line names gRPC's port, known once it is bound ("auto": the kernel's)
        grpc_port: int = getattr(app.state, "grpc_port", 0)  # type: ignore[attr-defined]
        grpc_bound = bool(grpc_port) or not settings.server.grpc_port
        if loading is not None and loading.done() and grpc_bound:
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                pass
            else:
                writer.close()
                systemd_notify.ready("serving")
                _log_ready(app, settings, host, port)
                return
        await asyncio.sleep(0.1)


def _log_ready(app: object, settings: Settings, host: str, port: int) -> None:
    registry = app.state.registry  # type: ignore[attr-defined]
    models = " ".join(
        f"{name}:{','.join(str(v) for v in sorted(registry.loaded(name)))}"
        for name in registry.names()
        if registry.loaded(name)
    )
    scheme = "https" if settings.server.tls_cert else "http"
    url_host = f"[{host}]" if ":" in host else host
    grpc_port = getattr(app.state, "grpc_port", 0)  # type: ignore[attr-defined]  # bound
    grpc = f" grpc={url_host}:{grpc_port}" if grpc_port else ""
    ready_s = time.time() - psutil.Process().create_time()
    log.info(
        'ready url=%s://%s:%s%s models="%s" ready_s=%.2f',
        scheme,
        url_host,
        port,
        grpc,
        models or "none",
        ready_s,
    )


def connection_cap(requested: int) -> int:
    """`requested`, lowered to keep FD_RESERVE descriptors below the open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft - FD_RESERVE))


async def serve_uvicorn(
    app: object,
    settings: Settings,
    stop: asyncio.Event,
    bounds: BoundsHit | None = None,
    listener: socket.socket | None = None,
) -> None:
    """Serve with Uvicorn + httptools (HTTP/1.1 only) until `stop` is set.

    Faster per request than Hypercorn on small models (see bench/RESULTS.md); Hypercorn's
    header cap and slow-client timeout are added back by `_guarded_httptools`.
    """
    import uvicorn

    s = settings.server
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=s.host,
        port=s.port,
        http=_guarded_httptools(settings, bounds or BoundsHit()),  # type: ignore[arg-type]
        ws="wsproto",  # already installed for Hypercorn
        lifespan="on",
        access_log=False,
        log_config=None,
        server_header=False,
        proxy_headers=False,  # the client address is the peer's, as with Hypercorn
        timeout_keep_alive=max(1, round(s.keep_alive_timeout_s)),
        timeout_graceful_shutdown=max(1, round(s.graceful_timeout_s)),
        ssl_certfile=str(s.tls_cert) if s.tls_cert else None,
        ssl_keyfile=str(s.tls_key) if s.tls_key else None,
        ssl_ca_certs=str(s.tls_client_ca) if s.tls_client_ca else None,
        ssl_cert_reqs=ssl.CERT_REQUIRED if s.tls_client_ca else ssl.CERT_NONE,
    )
    config.load()  # builds the SSL context now, so it can be hardened before serving
    if config.ssl is not None:
        harden_tls(config.ssl)
    server = _uvicorn_server_class()(config, s.tls_handshake_timeout_s)

    async def stop_when_asked() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.ensure_future(stop_when_asked())
    try:
        # SIGTERM/SIGINT during serve() also set should_exit
        await server.serve(sockets=[listener] if listener is not None else None)
    finally:
        watcher.cancel()


def _uvicorn_server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """Uvicorn's server with a TLS handshake timeout: uvicorn passes none to
        `create_server`, so asyncio's default of 60 s let an idle handshake hold a socket
        for a minute. Only the TCP listener (the socket `serve_uvicorn` passes, or
        host/port) differs from uvicorn's own start-up."""

        def __init__(self, config: uvicorn.Config, handshake_timeout_s: float) -> None:
            super().__init__(config)
            self.handshake_timeout_s = handshake_timeout_s

        async def startup(self, sockets: list | None = None) -> None:
            config = self.config
            if config.uds or config.fd or (sockets and len(sockets) > 1):
                await super().startup(sockets)
                return
            await self.lifespan.startup()
            if self.lifespan.should_exit:
                raise SystemExit(3)  # uvicorn's STARTUP_FAILURE

            def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> Any:
                return config.http_protocol_class(  # type: ignore[call-arg]
                    config=config,
                    server_state=self.server_state,
                    app_state=self.lifespan.state,
                    _loop=_loop,
                )

            loop = asyncio.get_running_loop()
            try:
                where: dict[str, Any] = (
                    {"sock": sockets[0]} if sockets else {"host": config.host, "port": config.port}
                )
                server = await loop.create_server(
                    create_protocol,
                    **where,
                    ssl=config.ssl,
                    backlog=config.backlog,
                    ssl_handshake_timeout=self.handshake_timeout_s if config.ssl else None,
                )
            except OSError as exc:
                log.error("cannot listen: %s", exc)
                await self.lifespan.shutdown()
                raise SystemExit(3) from None
            self.servers = [server]
            self._log_started_message(server.sockets)
            self.started = True

    return Server


class _HeadersTooLarge(Exception):
    pass


_name = itemgetter(0)
_value = itemgetter(1)
_rstrip_ows = methodcaller("rstrip", b" \t")


def _guarded_httptools(settings: Settings, bounds: BoundsHit) -> type:
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
        _head_bytes = 0
        _too_large = False
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
        _counted_as: str | None = None  # the client address this connection is counted under
        _parser_answer: bytes | None = None  # see `_answer_from_parser`

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
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
            self.flow.resume_reading()
            if self.pipeline:  # the next pipelined request starts
                cycle, app = self.pipeline.pop()
                self._start_asgi_task(cycle, app)
            else:
                self._idle_deadline = self.loop.time() + self.timeout_keep_alive
                self._check_by(self._idle_deadline)
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
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._idle_deadline = 0.0  # as uvicorn cancels its keep-alive timer
            if self._read_deadline:  # a request is arriving: the clock restarts
                self._read_deadline = self.loop.time() + read_timeout_s
            try:  # uvicorn's, written in
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()

        def on_message_begin(self) -> None:
            # uvicorn's written in (as the other parser callbacks: a call less per request)
            self.url = b""
            self.expect_100_continue = False
            self.headers = []
            self.scope = {  # type: ignore[typeddict-item]
                "type": "http",
                "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
                "http_version": "1.1",
                "server": self.server,
                "client": self.client,
                "scheme": self.scheme,  # type: ignore[typeddict-item]
                "root_path": self.root_path,
                "headers": self.headers,
                "state": self.app_state.copy(),
            }
            self._head_bytes = 0
            now = self.loop.time()
            self._read_deadline = now + read_timeout_s
            self._head_deadline = now + head_timeout_s
            self._check_by(now + first_timeout_s)

        def on_headers_complete(self) -> None:
            """Uvicorn's, written in, making a `_new_cycle` and starting its task."""
            idle.pop(self, None)  # a request is being served: not evicted for a newcomer
            self._head_deadline = 0.0
            self._headers_read()
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
            5.5 excludes it), `Expect: 100-continue` noted."""
            headers = self.headers
            headers[:] = zip(
                map(bytes.lower, map(_name, headers)),
                map(_rstrip_ows, map(_value, headers)),
                strict=True,
            )
            if b"expect" in map(_name, headers):
                for name, value in headers:
                    if name == b"expect" and value.lower() == b"100-continue":
                        self.expect_100_continue = True

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

        def on_url(self, url: bytes) -> None:
            # the head-bytes cap, written out in both callbacks: they run for every request
            self._head_bytes += len(url)
            if self._head_bytes > max_head_bytes:
                self._too_large = True
                raise _HeadersTooLarge  # httptools turns this into a parser error: 431
            self.url += url  # uvicorn's on_url

        def on_header(self, name: bytes, value: bytes) -> None:
            # Uvicorn's own on_header is done for all headers at once by `_headers_read`.
            self._head_bytes += len(name) + len(value) + 4
            if self._head_bytes > max_head_bytes:
                self._too_large = True
                raise _HeadersTooLarge  # httptools turns this into a parser error: 431
            self.headers.append((name, value))

        def on_body(self, body: bytes) -> None:
            # uvicorn's written in, with the body of a request answered from the parser
            # dropped unread
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
            body = b'{"error": "request headers are too large"}'
            self.transport.write(
                b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                b"content-type: application/json\r\nconnection: close\r\n"
                b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            self.transport.close()

        def _arm(self) -> None:
            self._read_deadline = self.loop.time() + read_timeout_s
            self._check_by(self._read_deadline)

        def _check_by(self, when: float) -> None:
            """Have the timer fire by `when`; an earlier one already pending is kept."""
            timer = self._deadline_timer
            if timer is not None:
                if timer.when() <= when:
                    return
                timer.cancel()
            self._deadline_timer = self.loop.call_at(when, self._check_deadlines)

        def _check_deadlines(self) -> None:
            self._deadline_timer = None
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
                    self._check_by(min(pending))

        def _cut_off(self, message: str, limit_s: float) -> None:
            """Close a connection whose client took too long (either deadline)."""
            if not self.transport.is_closing():
                log.info(message, limit_s)
                self.transport.close()

    # A full model's 429s skip the ASGI stack; every other answer is one write.
    return cycle_protocol(shedding_protocol(GuardedHttpTools))
