"""Which hosts are this box: the one loopback test behind plain-http exceptions (JWKS and
update URLs) and the loopback-only `/metrics` opening."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and the name localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
