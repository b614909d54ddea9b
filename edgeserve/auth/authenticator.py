"""Turn a request into a Principal: bearer JWTs when auth is on, everyone when it is off.

The web layer calls `authenticate(request)` through `edgeserve.auth.guard.requires`;
`authenticate_async`, when an implementation has it, does the same but fetches a remote
JWKS in a worker thread so that a slow identity provider never stalls the event loop.
A token that verified is remembered (`token_cache.py`), so its signature is checked once.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType
from typing import NoReturn, Protocol, runtime_checkable

import anyio.to_thread
from starlette.requests import HTTPConnection, Request

from edgeserve.auth.keyset import FileSource, KeySet, URLSource
from edgeserve.auth.principal import ALL_SCOPES, ANONYMOUS, SCOPE_METRICS, Principal
from edgeserve.auth.ratelimit import TokenBucketLimiter
from edgeserve.auth.settings import AuthSettings
from edgeserve.auth.token_cache import VerifiedTokenCache
from edgeserve.auth.verify import InvalidToken, TokenHeader, TokenVerifier
from edgeserve.config.hosts import is_loopback
from edgeserve.config.schema import ConfigError
from edgeserve.errors import Unauthorized

log = logging.getLogger(__name__)

# RFC 6750 §3: a bad token gets error="invalid_token"; a request with no credentials at
# all gets the bare challenge, without an error code.
INVALID_TOKEN_CHALLENGE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}
NO_TOKEN_CHALLENGE = {"WWW-Authenticate": "Bearer"}

OPEN_PRINCIPAL = Principal(subject=ANONYMOUS, scopes=ALL_SCOPES, claims=MappingProxyType({}))
LOOPBACK_METRICS_PRINCIPAL = Principal(
    subject=ANONYMOUS, scopes=frozenset({SCOPE_METRICS}), claims=MappingProxyType({})
)


@runtime_checkable
class Authenticator(Protocol):
    """Who is calling; raises Unauthorized (401) or Overloaded (429), never anything else."""

    def authenticate(self, request: Request) -> Principal: ...


class OpenAuthenticator:
    """Auth disabled: every caller holds every scope. Allowed only on a loopback address."""

    def authenticate(self, request: Request) -> Principal:
        return OPEN_PRINCIPAL


class JWTAuthenticator:
    """Bearer JWT access tokens (RFC 6750, RFC 9068) verified against a KeySet."""

    def __init__(
        self,
        settings: AuthSettings,
        keyset: KeySet,
        *,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.keyset = keyset
        self.verifier = TokenVerifier(settings, keyset)
        self.cache = VerifiedTokenCache(settings.token_cache_max_entries, settings.leeway_s)
        self.failures = TokenBucketLimiter(
            settings.failed_auth_rate_per_s,
            settings.failed_auth_burst,
            what="failed authentications from this address",
        )
        self.subjects = TokenBucketLimiter(
            settings.subject_rate_per_s, settings.subject_burst, what="requests for this token"
        )
        # Called as on_refused(client_address, reason) for each 401: the audit log's seam.
        self.on_refused = on_refused
        # The longest Authorization value worth parsing: "Bearer " and the longest token.
        self._max_header_chars = settings.max_token_bytes + len("Bearer ")

    def unusable_reason(self) -> str | None:
        """Why no token could pass now (for readiness), else None. A file key set is
        looked at again when due (a stat); a remote one is judged on what it holds."""
        if not self.keyset.source.remote and self.keyset.refresh_due():
            self.keyset.refresh()
        if not self.keyset.kids:
            return (
                "no token signing key is trusted (the JWKS holds no usable key): "
                "every token would be refused"
            )
        return None

    def authenticate(self, request: Request) -> Principal:
        found = self._bearer(request)
        if isinstance(found, Principal):
            return found
        key = self.cache.key(found)
        if self.keyset.refresh_due() and key in self.cache:  # changed keys empty the cache
            self.keyset.refresh()
        principal = self.cache.get(key, self.keyset.generation)
        if principal is None:
            header = self._header(request, found)
            if self.keyset.refresh_due(header.kid):
                self.keyset.refresh(header.kid)
            principal = self._verify(request, found, header, key)
        self.subjects.take(principal.subject)
        return principal

    async def authenticate_async(
        self, request: HTTPConnection, *, limited: bool = True
    ) -> Principal:
        """The caller, with the remote JWKS fetched off the event loop. One method for the
        whole of a cache hit (the bearer token, then the digest, the key set's freshness,
        the cache and the per-subject limit, in that order); `limited=False` skips the
        per-subject limit (`still_valid_async`).

        A hit costs a digest, dict lookups and the key set's freshness check (a stat of
        the JWKS file at most once per interval); pyjwt runs only on a miss. Only a cached
        token can make the key set refresh here: garbage goes on to the header checks
        first, as without a cache. The freshness check comes first: it is almost always
        False, and then the cache is looked up once, not twice."""
        found = self._bearer(request)
        if isinstance(found, Principal):
            return found
        cache = self.cache
        keyset = self.keyset
        key = cache.key(found)
        if keyset.refresh_due() and key in cache:  # changed keys empty the cache
            await self._refresh(None)
        principal = cache.get(key, keyset.generation)
        if principal is None:
            header = self._header(request, found)
            if keyset.refresh_due(header.kid):
                await self._refresh(header.kid)
            principal = self._verify(request, found, header, key)
        if limited and self.subjects.enabled:
            self.subjects.take(principal.subject)
        return principal

    async def still_valid_async(self, connection: HTTPConnection) -> Principal:
        """The caller of a long-lived stream, checked again before each of its messages:
        an expired token or one whose key was rotated out is refused (401) as on a new
        request. A cache hit costs a digest; the per-subject rate limit is not taken
        again (the stream's messages pass the event loop's gate instead)."""
        return await self.authenticate_async(connection, limited=False)

    async def _refresh(self, kid: str | None) -> None:
        """Re-read the key set; a remote one in a worker thread, off the event loop."""
        if self.keyset.source.remote:
            await anyio.to_thread.run_sync(self.keyset.refresh, kid)
        else:
            self.keyset.refresh(kid)

    def _bearer(self, request: HTTPConnection) -> Principal | str:
        """The bearer token, unparsed, or a Principal for an opened endpoint."""
        values = request.headers.getlist("authorization")
        if len(values) != 1:
            if not values:
                if self.settings.metrics_open_on_loopback and is_loopback(client_address(request)):
                    return LOOPBACK_METRICS_PRINCIPAL
                self._refuse(request, "missing token", NO_TOKEN_CHALLENGE)
            self._refuse(request, "more than one Authorization header")
        value = values[0]
        # Size first: nothing longer than a token can be is split, decoded or parsed.
        if len(value) > self._max_header_chars:
            self._refuse(request, "token too long")
        # The scheme is what comes before the first space, in any case (RFC 7235 §2.1):
        # "bearer " as the first seven characters, lower-cased, says just that.
        token = value[7:]
        if value[:7].lower() != "bearer " or not token or " " in token:
            self._refuse(request, "malformed Authorization header (want: Bearer <token>)")
        return token

    def _header(self, request: HTTPConnection, token: str) -> TokenHeader:
        try:
            return self.verifier.read_header(token)
        except InvalidToken as exc:
            self._refuse(request, exc.reason)

    def _verify(
        self, request: HTTPConnection, token: str, header: TokenHeader, key: bytes
    ) -> Principal:
        """Check the token with pyjwt; remember it if valid, refuse it (uncached) if not."""
        generation = self.keyset.generation  # the keys this verification uses
        try:
            principal = self.verifier.verify(token, header)
        except InvalidToken as exc:
            self._refuse(request, exc.reason)
        self.cache.put(key, principal, generation)
        return principal

    def _refuse(
        self,
        request: HTTPConnection,
        reason: str,
        headers: dict[str, str] = INVALID_TOKEN_CHALLENGE,
    ) -> NoReturn:
        # The peer's address is read here, on the failure path only (a valid token never
        # needs it). The failure limiter is consulted here too: a flood from an address
        # shared with honest clients (NAT, proxy, same host) is answered 429 without
        # logging or auditing each one, but a valid token from there is never refused.
        client = client_address(request)
        self.failures.take(client)
        log.info("auth refused client=%s reason=%r", client, reason)
        if self.on_refused is not None:
            try:
                self.on_refused(client, reason)
            except Exception:  # an audit hook must never turn a 401 into a 500
                log.exception("auth refusal hook failed client=%s", client)
        raise Unauthorized(f"invalid token: {reason}", headers=dict(headers))


def client_address(request: HTTPConnection) -> str:
    """The peer's address as the server saw it (no forwarding headers are trusted)."""
    client = request.client  # a property that builds a new Address at every read
    return client.host if client else "unknown"


def check_auth_allowed(enabled: bool, host: str) -> None:
    """Refuse to serve without auth beyond loopback; warn when it is off on loopback."""
    if enabled:
        return
    if not is_loopback(host):
        raise ConfigError(
            "auth.enabled",
            f"auth may be disabled only when [server] host is a loopback address, not {host!r}",
        )
    log.warning("auth disabled host=%s: every local caller holds every scope", host)


def jwks_path(settings: AuthSettings, state_dir: Path) -> Path:
    """Where the trusted JWKS file is: the config's jwks_file, else the local issuer's."""
    if not settings.jwks_file:
        return Path(state_dir) / "keys" / "jwks.json"
    return _under(state_dir, settings.jwks_file)


def _under(state_dir: Path, name: str) -> Path:
    """An absolute path as is; a relative one under state_dir."""
    path = Path(name)
    return path if path.is_absolute() else Path(state_dir) / path


def build_authenticator(settings: AuthSettings, state_dir: Path, host: str) -> Authenticator:
    """The authenticator the config asks for; ConfigError if it is not allowed."""
    check_auth_allowed(settings.enabled, host)
    if not settings.enabled:
        return OpenAuthenticator()
    if settings.jwks_url:
        ca_file = _under(state_dir, settings.jwks_ca_file) if settings.jwks_ca_file else None
        try:
            source: FileSource | URLSource = URLSource(
                settings.jwks_url, settings.jwks_timeout_s, settings.jwks_max_bytes, ca_file
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("auth.jwks_ca_file", f"cannot load CA file: {exc}") from None
    else:
        source = FileSource(jwks_path(settings, Path(state_dir)), settings.jwks_max_bytes)
    keyset = KeySet(
        source,
        algorithms=settings.algorithms,
        max_keys=settings.max_keys,
        cooldown_s=settings.jwks_cooldown_s,
        max_age_s=settings.jwks_max_age_s,
        file_check_interval_s=settings.jwks_file_check_interval_s,
    )
    if not source.remote:
        keyset.refresh()  # a missing or broken file is logged now, at start-up
    log.info(
        "auth enabled source=%r issuer=%s audience=%s", source, settings.issuer, settings.audience
    )
    return JWTAuthenticator(settings, keyset)
