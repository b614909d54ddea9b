"""Authorisation declared per route: `@requires("infer")` on each endpoint.

Scopes are checked where the endpoint is defined, never by matching path strings in a
middleware, so `//api`, `%2e%2e/` or a forged Host header cannot route around them.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from edgeserve.auth.authenticator import NO_TOKEN_CHALLENGE, build_authenticator
from edgeserve.auth.principal import ALL_SCOPES, CALLER, Principal
from edgeserve.errors import Unauthorized

__all__ = [
    "Endpoint",
    "authenticate",
    "authorize",
    "build_authenticator",
    "requires",
    "still_authenticated",
]

Endpoint = Callable[[Request], Awaitable[Response]]


async def authenticate(request: Request) -> Principal:
    """The caller of `request`, via `request.app.state.authenticator` (401/429 otherwise)."""
    authenticator = request.app.state.authenticator
    authenticate_async = getattr(authenticator, "authenticate_async", None)
    if authenticate_async is not None:
        principal = await authenticate_async(request)
    else:
        principal = authenticator.authenticate(request)
    CALLER.set(principal.subject)
    return principal


async def still_authenticated(connection: HTTPConnection) -> Principal:
    """The caller of a stream, checked again for its next message (expiry, rotated keys);
    raises Unauthorized (401) once the token no longer holds."""
    authenticator = connection.app.state.authenticator
    still_valid = getattr(authenticator, "still_valid_async", None)
    if still_valid is not None:
        return await still_valid(connection)
    return authenticator.authenticate(connection)


async def authorize(request: Request, scope: str, *alternatives: str) -> Principal:
    """The caller of `request` if it holds `scope` (or one of `alternatives`), else 401 or
    403; left in `request.state.principal` even on a 403, for the audit log. What
    `requires` checks, for the infer answer that is not a Starlette endpoint."""
    principal = await authenticate(request)
    scopes = principal.scopes
    if scope not in scopes and principal.anonymous:
        # Only some endpoints are open without a token; this one needs one.
        raise Unauthorized("invalid token: missing token", headers=dict(NO_TOKEN_CHALLENGE))
    request.state.principal = principal
    if scope in scopes:  # held directly: the usual case, answered without a call
        return principal
    if alternatives and any(principal.holds(name) for name in alternatives):
        return principal
    principal.require(scope)
    return principal


def requires(scope: str, *alternatives: str) -> Callable[[Endpoint], Endpoint]:
    """Decorator for a Starlette endpoint `async def f(request)`: authenticate the caller,
    check `scope` (or one of `alternatives`), store `request.state.principal`, call `f`."""
    accepted = (scope, *alternatives)
    for name in accepted:
        if name not in ALL_SCOPES:
            raise ValueError(f"unknown scope {name!r} (known: {', '.join(sorted(ALL_SCOPES))})")

    def decorate(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            await authorize(request, scope, *alternatives)
            return await endpoint(request)

        guarded.required_scope = scope  # type: ignore[attr-defined]
        return guarded

    return decorate
