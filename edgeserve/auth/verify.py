"""Verify a JWT access token against trusted keys and the [auth] config.

pyjwt checks the signature and the registered claims, but leaves much to the caller;
this module adds what it does not do: it reads and vets the header before any key is
looked up (size, shape, `alg` allow-list, `kid` charset, `crit`, `typ`), takes the
algorithm from the trusted key, insists that times are JSON integers, and turns every
failure, whatever pyjwt raises, into one `InvalidToken` with a fixed reason.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt

from edgeserve.auth.keyset import KeySet, valid_kid
from edgeserve.auth.principal import Principal, parse_scopes
from edgeserve.auth.settings import AuthSettings

# Three base64url segments without padding: anything else is not a compact JWS.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
REQUIRED_CLAIMS = ("exp", "iat", "iss", "aud", "sub")
MAX_SUBJECT_CHARS = 256

_PYJWT_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not yet valid"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
)


class InvalidToken(Exception):
    """The token is refused; `reason` is a fixed phrase, never token content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class TokenHeader:
    """The vetted protected header: the algorithm claimed and the key id to look up."""

    alg: str
    kid: str


class TokenVerifier:
    """Checks compact JWS access tokens; pure apart from the KeySet's lookups."""

    def __init__(self, settings: AuthSettings, keyset: KeySet) -> None:
        self.settings = settings
        self.keyset = keyset
        self._algorithms = frozenset(settings.algorithms)
        self._typ = _normal_typ(settings.require_typ) if settings.require_typ else None

    def read_header(self, token: str) -> TokenHeader:
        """Vet the header without touching any key; raises InvalidToken."""
        if len(token) > self.settings.max_token_bytes:
            raise InvalidToken("token too long")
        if not TOKEN_PATTERN.fullmatch(token):
            raise InvalidToken("malformed token")
        try:
            header = json.loads(_b64url_decode(token.split(".", 1)[0]))
        except Exception:  # binascii, unicode and JSON errors alike
            raise InvalidToken("malformed header") from None
        if not isinstance(header, dict):
            raise InvalidToken("malformed header")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise InvalidToken("algorithm not allowed")
        if "crit" in header:  # we implement no JWS extension, so any critical one is unknown
            raise InvalidToken("unsupported critical header")
        if self._typ is not None:
            typ = header.get("typ")
            if not isinstance(typ, str) or _normal_typ(typ) != self._typ:
                raise InvalidToken("wrong token type")
        kid = header.get("kid")
        if kid is None:
            raise InvalidToken("missing key id")
        if not valid_kid(kid):
            raise InvalidToken("malformed key id")
        # jku, x5u, x5c and jwk are deliberately never read: keys come only from the KeySet.
        return TokenHeader(alg=alg, kid=kid)

    def verify(self, token: str, header: TokenHeader | None = None) -> Principal:
        """The caller this token proves, or InvalidToken."""
        if header is None:
            header = self.read_header(token)
        key = self.keyset.get(header.kid)
        if key is None:
            raise InvalidToken("unknown key id")
        if key.algorithm != header.alg:
            raise InvalidToken("algorithm does not match the key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway_s,
                options={"require": list(REQUIRED_CLAIMS), "verify_signature": True},
            )
        except Exception as exc:  # OverflowError (1e400), ValueError (NaN) are not PyJWTErrors
            raise InvalidToken(_reason(exc)) from None
        return self._principal(claims)

    def _principal(self, claims: dict[str, Any]) -> Principal:
        """Checks pyjwt is lenient about (types, exactness), then the Principal."""
        for name in ("exp", "iat", "nbf"):
            if name in claims and type(claims[name]) is not int:
                raise InvalidToken(f"{name} is not an integer")
        if claims["iss"] != self.settings.issuer:
            raise InvalidToken("wrong issuer")
        aud = claims["aud"]
        audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(audiences, list) or self.settings.audience not in audiences:
            raise InvalidToken("wrong audience")
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub or len(sub) > MAX_SUBJECT_CHARS:
            raise InvalidToken("malformed subject")
        raw_scopes = claims.get("scope", claims.get("scp", ""))
        try:
            scopes = parse_scopes(raw_scopes)
        except ValueError:
            raise InvalidToken("malformed scope") from None
        return Principal(subject=sub, scopes=scopes, claims=MappingProxyType(claims))


def _b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _normal_typ(typ: str) -> str:
    """RFC 7515 §4.1.9: "application/" may be omitted and media types are case-insensitive."""
    typ = typ.lower()
    return typ[len("application/") :] if typ.startswith("application/") else typ


def _reason(exc: Exception) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim}" if exc.claim in REQUIRED_CLAIMS else "missing claim"
    for kind, reason in _PYJWT_REASONS:
        if isinstance(exc, kind):
            return reason
    return "malformed token"
