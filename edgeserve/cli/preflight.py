"""Checks `edgeserve serve` makes before it writes anything: a serve started in the wrong
folder or on a taken port fails with one line and leaves no `.edgeserve/keys` behind."""

from __future__ import annotations

import errno
import socket

from edgeserve.config.loader import ConfigError, Settings

# Exit code for a port another process holds (README, Configuration; `serve --help`).
EXIT_PORT_IN_USE = 3


class PortInUse(Exception):
    """The HTTP or gRPC port is held by another process."""

    def __init__(self, port: int) -> None:
        super().__init__(f"port {port} is in use")
        self.port = port


def check_before_serving(settings: Settings) -> socket.socket:
    """Raise ConfigError for a repository that cannot be read and PortInUse for a taken
    port, before the state folder, keys or databases are created; return the HTTP
    listener, bound and listening from here on, so that no other process can take the
    port between this check and serving (port 0: a free port the kernel picks)."""
    from edgeserve.serving.repository import scan_repository

    scan_repository(settings.models.repository, settings.models.load or None, warn=False)
    server = settings.server
    if server.grpc_port:
        from edgeserve.cli.extras import missing_extra

        for module in ("grpc", "tritonclient"):
            message = missing_extra(module)
            if message is not None:
                raise ConfigError("server.grpc_port", f"gRPC needs {message}")
    listener = open_listener(server.host, server.port)
    try:
        if server.grpc_port != "auto" and server.grpc_port:  # "auto": the kernel picks a free one
            _check_port(server.host, server.grpc_port)
    except BaseException:
        listener.close()
        raise
    return listener


def open_listener(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on `host`:`port` (SO_REUSEADDR, as uvicorn and Hypercorn
    bind), non-blocking for the event loop; PortInUse when another process holds it."""
    listener = _bound(host, port)
    listener.listen(backlog)
    listener.setblocking(False)
    return listener


def _check_port(host: str, port: int) -> None:
    """Bind the way the server will (SO_REUSEADDR, as uvicorn and Hypercorn do), then let
    go: a port in TIME_WAIT is free, one with a listener is not."""
    _bound(host, port).close()


def _bound(host: str, port: int) -> socket.socket:
    """A socket bound the way the server binds: a port in TIME_WAIT is free, one with a
    listener is not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError("server.host", f"cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(port) from None
        reason = exc.strerror or str(exc)  # no address here, a port below 1024, ...
        raise ConfigError("server.host", f"cannot listen on {host} port {port}: {reason}") from None
    return sock
