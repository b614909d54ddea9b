"""Who is calling and what they may do: the result of authentication, checked per route."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from edgeserve.errors import Forbidden

SCOPE_INFER = "infer"  # inference, and feedback on one's own requests
SCOPE_READ = "read"  # metadata, statistics, reports, dashboard
SCOPE_ADMIN = "admin"  # updates, experiments, flags, keys; implies read and feedback
SCOPE_METRICS = "metrics"  # Prometheus scrape
SCOPE_FEEDBACK = "feedback"  # label any caller's requests (a labelling service)
ALL_SCOPES: frozenset[str] = frozenset(
    {SCOPE_INFER, SCOPE_READ, SCOPE_ADMIN, SCOPE_METRICS, SCOPE_FEEDBACK}
)
# Scopes a token holds because it holds another one: an admin who may change the box may
# also see it (dashboard, update and telemetry status) and label any request.
IMPLIED_SCOPES: dict[str, frozenset[str]] = {SCOPE_ADMIN: frozenset({SCOPE_FEEDBACK, SCOPE_READ})}

# Subject of a principal that presented no token (auth off, or metrics opened on loopback).
ANONYMOUS = ""

# The subject of the request this task is serving, set when it is authenticated: for the
# parts that see a request only through the data plane (the health watch counts callers).
CALLER: ContextVar[str] = ContextVar("edgeserve_caller", default=ANONYMOUS)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's `sub`, its scopes and its verified claims."""

    subject: str
    scopes: frozenset[str]
    claims: Mapping[str, Any] = field(compare=False, hash=False)

    @property
    def anonymous(self) -> bool:
        """True when no token was presented (auth disabled, or an opened endpoint)."""
        return self.subject == ANONYMOUS

    def holds(self, scope: str) -> bool:
        """True if the token grants `scope`, directly or through one that implies it."""
        return scope in self.scopes or any(
            scope in IMPLIED_SCOPES.get(held, ()) for held in self.scopes
        )

    def require(self, scope: str) -> None:
        """Raise 403 insufficient_scope (RFC 6750 §3.1) unless this caller holds `scope`."""
        if not self.holds(scope):
            raise Forbidden(
                f"insufficient_scope: this endpoint needs scope {scope!r}",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            )


def parse_scopes(value: Any) -> frozenset[str]:
    """Scopes from a `scope` claim (space-separated string, RFC 9068) or a `scp` list.

    Unknown scope names are kept (another service may use them) but grant nothing here.
    """
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(s for v in value for s in v.split())
    raise ValueError("scope claim must be a string or a list of strings")
