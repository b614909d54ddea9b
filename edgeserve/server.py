"""Run the application under Hypercorn, owning signals so shutdown drains cleanly.

SIGTERM/SIGINT stop accepting, let in-flight requests finish (graceful_timeout_s),
then run the lifespan shutdown. SIGHUP reloads the model repository without dropping
requests.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from edgeserve.app import build_app
from edgeserve.config.loader import ConfigError, Settings
from edgeserve.process import systemd_notify

log = logging.getLogger(__name__)

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


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """Hypercorn settings from ours; its defaults (no read timeout, Server header) are not."""
    s = settings.server
    config = _HardenedConfig()
    host = f"[{s.host}]" if ":" in s.host else s.host
    config.bind = [f"{host}:{s.port}"]
    config.keep_alive_timeout = s.keep_alive_timeout_s
    config.read_timeout = int(max(1, s.read_timeout_s))
    config.graceful_timeout = s.graceful_timeout_s
    config.include_server_header = False
    config.h11_max_incomplete_size = settings.limits.max_header_bytes
    config.h2_max_header_list_size = settings.limits.max_header_bytes
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.ssl_handshake_timeout = 5.0
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
                'server.event_loop = "uvloop" but uvloop is not installed (pip install uvloop)'
            ) from None
        return asyncio.run
    return uvloop.run


async def run_server(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT."""
    app = build_app(settings)
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
    log.info("listening url=%s://%s:%s", scheme, settings.server.host, settings.server.port)
    watchdog = asyncio.ensure_future(systemd_notify.run_watchdog())
    announce = asyncio.ensure_future(_announce_ready(app, settings))
    try:
        if settings.server.engine == "uvicorn":
            await serve_uvicorn(app, settings, stop)
        else:
            await serve(app, hypercorn_config(settings), shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    finally:
        announce.cancel()
        watchdog.cancel()
    log.info("stopped")


async def _announce_ready(app: object, settings: Settings) -> None:
    """READY=1 once the port accepts connections and model loading has finished."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.server.host, settings.server.host)
    while True:
        loading = getattr(app.state, "loading", None)  # type: ignore[attr-defined]
        if loading is not None and loading.done():
            try:
                _, writer = await asyncio.open_connection(host, settings.server.port)
            except OSError:
                pass
            else:
                writer.close()
                systemd_notify.ready("serving")
                return
        await asyncio.sleep(0.1)


async def serve_uvicorn(app: object, settings: Settings, stop: asyncio.Event) -> None:
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
        http=_guarded_httptools(settings),  # type: ignore[arg-type]
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
    server = uvicorn.Server(config)

    async def stop_when_asked() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.ensure_future(stop_when_asked())
    try:
        await server.serve()  # SIGTERM/SIGINT during serve() also set should_exit
    finally:
        watcher.cancel()


class _HeadersTooLarge(Exception):
    pass


def _guarded_httptools(settings: Settings) -> type:
    """Uvicorn's httptools protocol plus Hypercorn's two defences: a cap on request-head
    bytes (431) and `read_timeout_s` of silence while a request is arriving (or before the
    first one) closes the connection; and one neither has: a request's line and headers
    must be complete within `request_head_timeout_s` of its first byte, so a client
    trickling a byte just inside the read timeout cannot hold a connection for long."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from edgeserve.http.shedding import shedding_protocol

    max_head_bytes = settings.limits.max_header_bytes
    read_timeout_s = settings.server.read_timeout_s
    head_timeout_s = settings.server.request_head_timeout_s

    class GuardedHttpTools(HttpToolsProtocol):
        _head_bytes = 0
        _too_large = False
        # Deadlines (loop time, 0 = off) checked by one lazy timer per connection: arming
        # a deadline is a float store. A timer per deadline and request (call_later and
        # cancel each time) took a quarter of the event loop at 4x overload, with
        # thousands of connections in the timer heap.
        _read_deadline = 0.0  # the next bytes of a request must arrive by then
        _head_deadline = 0.0  # the request's line and headers must be complete by then
        _deadline_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._read_deadline = self._head_deadline = 0.0
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
                self._deadline_timer = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._read_deadline:  # a request is arriving: the clock restarts
                self._read_deadline = self.loop.time() + read_timeout_s
            super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            now = self.loop.time()
            self._read_deadline = now + read_timeout_s
            self._head_deadline = now + head_timeout_s
            self._check_by(min(self._read_deadline, self._head_deadline))

        def on_headers_complete(self) -> None:
            self._head_done()
            super().on_headers_complete()

        def _head_done(self) -> None:
            self._head_deadline = 0.0

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

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

        def _count(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > max_head_bytes:
                self._too_large = True
                raise _HeadersTooLarge  # httptools turns this into a parser error: 431 above

        def _arm(self) -> None:
            self._read_deadline = self.loop.time() + read_timeout_s
            self._check_by(self._read_deadline)

        def _disarm(self) -> None:
            self._read_deadline = 0.0

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
            else:  # deadlines moved on (or ended) since the timer was set
                pending = [d for d in (self._read_deadline, self._head_deadline) if d]
                if pending:
                    self._check_by(min(pending))

        def _cut_off(self, message: str, limit_s: float) -> None:
            """Close a connection whose client took too long (either deadline)."""
            if not self.transport.is_closing():
                log.info(message, limit_s)
                self.transport.close()

    return shedding_protocol(GuardedHttpTools)  # a full model's 429s skip the ASGI stack
