"""The trailing-slash redirect (`/dashboard/` -> `/dashboard`), relative.

Starlette's own builds an absolute URL from the request's `Host` header, so a forged
Host made the server redirect a browser to another site (cache poisoning, phishing).
This one sends a path only, never a host, and never a path that a browser would read
as another host (`//evil.example`).
"""

from __future__ import annotations

from urllib.parse import quote

from starlette.responses import RedirectResponse
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Receive, Scope, Send


def relative_slash_redirects(router: Router) -> None:
    """Replace `router`'s trailing-slash redirect with the relative one."""
    router.redirect_slashes = False
    router.default = _redirecting(router, router.default)


def _redirecting(router: Router, fallback: ASGIApp) -> ASGIApp:
    async def default(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path != "/":
            other = path.rstrip("/") if path.endswith("/") else path + "/"
            if other.startswith("/") and not other.startswith(("//", "/\\")):
                alt = {**scope, "path": other}
                if any(route.matches(alt)[0] is not Match.NONE for route in router.routes):
                    query = scope.get("query_string", b"").decode("latin-1")
                    location = quote(other) + (f"?{query}" if query else "")
                    await RedirectResponse(location)(scope, receive, send)
                    return
        await fallback(scope, receive, send)

    return default
