"""The [auth] section of edgeserve.toml: who may call the box, and how tokens are checked."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from edgeserve.config.hosts import is_loopback
from edgeserve.config.schema import ConfigError, setting

# The only signature algorithms a token may use; HMAC and `none` are never accepted,
# because an HMAC "key" would be the public key everyone can read.
SUPPORTED_ALGORITHMS = ("EdDSA", "ES256", "RS256")


@dataclass(frozen=True)
class AuthSettings:
    """How callers prove who they are (JWT bearer tokens) and how keys are found."""

    enabled: bool = True
    issuer: str = "edgeserve-local"
    audience: str = "edgeserve"
    jwks_file: str = ""  # empty = <state_dir>/keys/jwks.json; relative = under state_dir
    jwks_url: str = ""  # an identity provider's JWKS over HTTPS; replaces jwks_file
    jwks_ca_file: str = ""  # PEM CA bundle to trust for jwks_url; empty = the system's
    jwks_cooldown_s: float = setting(30.0, min=1.0, max=86400.0)
    jwks_max_age_s: float = setting(3600.0, min=10.0, max=7 * 86400.0)
    jwks_timeout_s: float = setting(5.0, min=0.1, max=60.0)
    jwks_max_bytes: int = setting(256 * 1024, min=1024, max=16 * 1024 * 1024)
    jwks_file_check_interval_s: float = setting(1.0, min=0.0, max=60.0)
    max_keys: int = setting(16, min=1, max=256)
    leeway_s: int = setting(30, min=0, max=300)
    require_typ: str = "at+jwt"  # empty = any typ
    algorithms: list[str] = setting(list(SUPPORTED_ALGORITHMS))
    metrics_open_on_loopback: bool = False
    max_token_bytes: int = setting(8192, min=512, max=65536)
    failed_auth_rate_per_s: float = setting(1.0, min=0.001, max=10000.0)
    failed_auth_burst: int = setting(20, min=0, max=100000)  # 0 = no limit
    subject_rate_per_s: float = setting(100.0, min=0.001, max=1e6)
    subject_burst: int = setting(0, min=0, max=1_000_000)  # 0 = no limit per subject
    token_cache_max_entries: int = setting(4096, min=0, max=100_000)  # 0 = no cache

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ConfigError("auth.issuer", "must not be empty")
        if not self.audience:
            raise ConfigError("auth.audience", "must not be empty")
        if not self.algorithms:
            raise ConfigError("auth.algorithms", "must name at least one algorithm")
        for alg in self.algorithms:
            if alg not in SUPPORTED_ALGORITHMS:
                allowed = ", ".join(SUPPORTED_ALGORITHMS)
                raise ConfigError("auth.algorithms", f"must be among {allowed}, got {alg!r}")
        if self.jwks_url:
            if self.jwks_file:
                raise ConfigError("auth.jwks_url", "set jwks_url or jwks_file, not both")
            check_jwks_url(self.jwks_url)


def check_jwks_url(url: str) -> None:
    """HTTPS only, except plain HTTP to a loopback address (a sidecar or a test)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return
    raise ConfigError("auth.jwks_url", "must be an https:// URL (http:// only for loopback)")
