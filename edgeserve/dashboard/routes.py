"""GET /dashboard (scope read). A browser cannot send a bearer header on navigation, so
the token is entered once and kept in an HttpOnly, SameSite=Strict session cookie
scoped to /dashboard; API clients may still send the header."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from edgeserve.auth.guard import authenticate
from edgeserve.dashboard import render
from edgeserve.errors import EdgeserveError, Forbidden, Unauthorized
from edgeserve.http.body import read_body

COOKIE = "edgeserve_dashboard"
# The login form holds one token: a few hundred bytes. Anything larger is refused on its
# Content-Length before a byte of it is read; the body deadline bounds a slow one.
MAX_LOGIN_BODY_BYTES = 4096
STATIC = Path(__file__).with_name("static")


async def _principal_from(request: Request, token: str | None) -> Any:
    if token is None:
        return await authenticate(request)
    headers = [(k, v) for k, v in request.scope["headers"] if k != b"authorization"]
    headers.append((b"authorization", b"Bearer " + token.encode("latin-1", "replace")))
    return await authenticate(Request({**request.scope, "headers": headers}))


async def _viewer(request: Request) -> Any | None:
    """The principal allowed to read, from the header or the session cookie; None if none."""
    if "authorization" not in request.headers and not request.cookies.get(COOKIE):
        return None  # the login page: no credential was offered, so none failed
    for token in (None, request.cookies.get(COOKIE)):
        if token is None and "authorization" not in request.headers and request.cookies.get(COOKIE):
            continue  # a browser with a cookie: skip the header-less attempt
        try:
            principal = await _principal_from(request, token)
            principal.require("read")
            return principal
        except (Unauthorized, Forbidden):
            continue
    return None


async def dashboard(request: Request) -> Response:
    if await _viewer(request) is None:
        message = "That token was not accepted." if request.cookies.get(COOKIE) else ""
        response = HTMLResponse(render.login(message), status_code=401 if message else 200)
        if message:
            response.delete_cookie(COOKIE, path="/dashboard")
        return response
    state = request.app.state
    reports = []
    if state.experiments is not None:
        for exp in sorted(
            state.experiments.experiments.values(), key=lambda e: (e.status != "active", -e.created)
        ):
            reports.append(await state.experiments.report(exp.id))
    traffic = await asyncio.to_thread(_traffic, state.settings.server.state_dir / "telemetry.db")
    flags = state.experiments.flags.to_json() if state.experiments is not None else []
    drift = [c.as_dict() for c in state.experiments.drift] if state.experiments else []
    return HTMLResponse(render.page(_models(state.registry), traffic, reports, flags, drift))


async def open_session(request: Request) -> Response:
    """A session from the login form's token, or from the bearer header: a client that
    sends the header is authenticated before (and without) any body read. A browser
    posting from another site's page is refused first (login CSRF)."""
    public_url = request.app.state.settings.server.public_url
    if not _same_origin(request, public_url):
        return HTMLResponse(render.login("Sign in from this server's own page."), status_code=403)
    token = _bearer(request)
    if token is None:
        body = await read_body(request, MAX_LOGIN_BODY_BYTES)
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        token = form.get("token", [""])[0].strip()
    try:
        principal = await _principal_from(request, token)
        principal.require("read")
    except EdgeserveError:
        return HTMLResponse(render.login("That token was not accepted."), status_code=401)
    response = RedirectResponse("/dashboard", status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" or public_url.startswith("https://"),
    )
    return response


def _same_origin(request: Request, public_url: str) -> bool:
    """Whether a browser's `Origin` is this server's: the configured public URL's origin,
    else the scheme and Host the request came with. A request without `Origin` is not a
    browser's cross-site form post (browsers send it on every POST) and passes."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    if public_url:
        parts = urllib.parse.urlsplit(public_url)
        own = f"{parts.scheme}://{parts.netloc}"
    else:
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    return origin.strip().lower() == own.lower()


def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def close_session(request: Request) -> Response:
    response = RedirectResponse("/dashboard", status_code=303)
    response.delete_cookie(COOKIE, path="/dashboard")
    return response


async def stylesheet(request: Request) -> Response:
    return FileResponse(STATIC / "dashboard.css", media_type="text/css")


def _models(registry: Any) -> list[dict[str, Any]]:
    models = []
    for name in registry.names():
        loaded = registry.loaded(name)
        versions = []
        for number, status in sorted(registry.statuses(name).items()):
            version = loaded.get(number)
            versions.append(
                {
                    "version": number,
                    "state": status.state.value,
                    "reason": status.reason,
                    "backend": version.runtime.backend if version else None,
                }
            )
        try:
            default = registry.default_version(name)
        except KeyError:
            default = None
        models.append({"name": name, "versions": versions, "default": default})
    return models


def _traffic(db_path: Path) -> dict[str, Any]:
    now = time.time()
    out: dict[str, Any] = {"per_10s": [0.0] * 60, "models": {}}
    if not db_path.exists():
        return out
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
    try:
        for bucket, count in db.execute(
            "SELECT CAST((time - ?) / 10 AS INTEGER), count(*) FROM inferences "
            "WHERE time >= ? AND shadow = 0 GROUP BY 1",
            (now - 600, now - 600),
        ):
            if 0 <= bucket < 60:
                out["per_10s"][bucket] = float(count)
        for model, count, errors in db.execute(
            "SELECT model, count(*), sum(status >= 500) FROM inferences "
            "WHERE time >= ? AND shadow = 0 GROUP BY model",
            (now - 300,),
        ):
            latencies = np.array(
                [
                    r[0]
                    for r in db.execute(
                        "SELECT total_s FROM inferences WHERE model = ? AND time >= ? "
                        "AND status = 200 AND shadow = 0 ORDER BY seq DESC LIMIT 20000",
                        (model, now - 300),
                    )
                ]
            )
            out["models"][model] = {
                "requests_per_s": count / 300.0,
                "p50_ms": float(np.percentile(latencies, 50) * 1000) if latencies.size else None,
                "p99_ms": float(np.percentile(latencies, 99) * 1000) if latencies.size else None,
                "error_rate": (errors or 0) / count if count else None,
            }
    except sqlite3.Error:
        pass  # an empty or locked buffer: show no traffic rather than fail the page
    finally:
        db.close()
    return out


ROUTES = [
    Route("/dashboard", dashboard, methods=["GET"]),
    Route("/dashboard/session", open_session, methods=["POST"]),
    Route("/dashboard/logout", close_session, methods=["POST"]),
    Route("/dashboard/static/dashboard.css", stylesheet, methods=["GET"]),
]
