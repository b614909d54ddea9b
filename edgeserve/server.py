"""Run the application under Hypercorn, owning signals so shutdown drains cleanly.

SIGTERM/SIGINT stop accepting, let in-flight requests finish (graceful_timeout_s),
then run the lifespan shutdown. SIGHUP reloads the model repository without dropping
requests.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

import psutil
from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig
from starlette.applications import Starlette

from edgeserve.app import build_app
from edgeserve.config.loader import ConfigError, Settings
from edgeserve.http.body_deadline import BodyDeadline
from edgeserve.http.bounds import BoundsHit
from edgeserve.http.protocol import guarded_httptools
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


async def serve_uvicorn(
    app: object,
    settings: Settings,
    stop: asyncio.Event,
    bounds: BoundsHit | None = None,
    listener: socket.socket | None = None,
) -> None:
    """Serve with Uvicorn + httptools (HTTP/1.1 only) until `stop` is set.

    Faster per request than Hypercorn on small models (see bench/RESULTS.md); Hypercorn's
    header cap and slow-client timeout are added back by edgeserve/http/protocol.py.
    """
    import uvicorn

    s = settings.server
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=s.host,
        port=s.port,
        http=guarded_httptools(settings, bounds or BoundsHit()),  # type: ignore[arg-type]
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


_guarded_httptools = guarded_httptools  # the name bench/loopops.py imports (any checkout)
