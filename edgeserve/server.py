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

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

from edgeserve.app import build_app
from edgeserve.config import Settings

log = logging.getLogger(__name__)


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """Hypercorn settings from ours; its defaults (no read timeout, Server header) are not."""
    s = settings.server
    config = HypercornConfig()
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
        task = asyncio.ensure_future(reload())
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    scheme = "https" if settings.server.tls_cert else "http"
    log.info("listening url=%s://%s:%s", scheme, settings.server.host, settings.server.port)
    await serve(app, hypercorn_config(settings), shutdown_trigger=stop.wait)  # type: ignore[arg-type]
    log.info("stopped")
