"""Authentication and authorisation: JWT bearer tokens, trusted keys, scopes per route."""

from edgeserve.auth.authenticator import (
    Authenticator,
    JWTAuthenticator,
    OpenAuthenticator,
    build_authenticator,
    check_auth_allowed,
)
from edgeserve.auth.guard import requires
from edgeserve.auth.keyset import KeySet, VerificationKey
from edgeserve.auth.principal import (
    ALL_SCOPES,
    SCOPE_ADMIN,
    SCOPE_FEEDBACK,
    SCOPE_INFER,
    SCOPE_METRICS,
    SCOPE_READ,
    Principal,
)
from edgeserve.auth.ratelimit import TokenBucketLimiter
from edgeserve.auth.settings import AuthSettings

__all__ = [
    "ALL_SCOPES",
    "SCOPE_ADMIN",
    "SCOPE_FEEDBACK",
    "SCOPE_INFER",
    "SCOPE_METRICS",
    "SCOPE_READ",
    "AuthSettings",
    "Authenticator",
    "JWTAuthenticator",
    "KeySet",
    "OpenAuthenticator",
    "Principal",
    "TokenBucketLimiter",
    "VerificationKey",
    "build_authenticator",
    "check_auth_allowed",
    "requires",
]
