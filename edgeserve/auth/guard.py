# TEMPORARY stub by the lead so the server runs before the auth work lands.
# The auth engineer replaces this whole file (keep the names requires/build_authenticator).
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class _Anyone:
    subject: str = "anonymous"
    scopes: frozenset = frozenset({"infer", "read", "admin", "metrics"})
    claims: dict = field(default_factory=dict)


class _Open:
    def authenticate(self, request: Any) -> _Anyone:
        return _Anyone()


def build_authenticator(settings: Any, state_dir: Any, host: str) -> _Open:
    return _Open()


def requires(scope: str):
    def wrap(endpoint):
        @functools.wraps(endpoint)
        async def guarded(request):
            request.state.principal = request.app.state.authenticator.authenticate(request)
            return await endpoint(request)
        guarded.required_scope = scope
        return guarded
    return wrap
