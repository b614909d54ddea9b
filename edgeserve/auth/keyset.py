"""Trusted token-verification keys, selected by `kid` from a JWKS file or URL.

Unlike pyjwt's PyJWKClient this cache never refetches on every unknown `kid` (a flood of
random kids costs at most one fetch per cooldown), keeps the last good keys when a fetch
fails or yields nothing usable, caps the number of keys, and picks up rotation without a
restart: a file is re-read when it changes, a URL is refetched when a new `kid` appears
or the keys grow old. Each key carries its own algorithm, so the token header never
chooses how it is verified.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

log = logging.getLogger(__name__)

# A key id must look like one before it is used for anything: bounded, no path characters.
KID_PATTERN = re.compile(r"[A-Za-z0-9._~+=:-]{1,128}")
MIN_RSA_BITS = 2048


class JWKSError(ValueError):
    """A JWKS document (or one source read) is unusable; the message names why, not the data."""


@dataclass(frozen=True)
class VerificationKey:
    """One trusted public key and the only algorithm it may verify."""

    kid: str
    algorithm: str  # "EdDSA" | "ES256" | "RS256"
    key: Any  # a cryptography public key object


def valid_kid(kid: object) -> bool:
    """True for a key id safe to look up (length cap, conservative charset)."""
    return isinstance(kid, str) and KID_PATTERN.fullmatch(kid) is not None


def parse_jwks(
    data: bytes, algorithms: Collection[str], max_keys: int
) -> dict[str, VerificationKey]:
    """The usable signing keys of a JWKS, by kid; unusable entries are skipped and logged."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise JWKSError("not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JWKSError('not a JWKS (no "keys" list)')
    keys: dict[str, VerificationKey] = {}
    for index, jwk in enumerate(doc["keys"]):
        try:
            key = _parse_jwk(jwk, algorithms)
        except JWKSError as exc:
            log.warning("jwks key skipped index=%d reason=%s", index, exc)
            continue
        if key.kid in keys:
            log.warning("jwks key skipped index=%d reason=duplicate kid", index)
            continue
        if len(keys) >= max_keys:
            log.warning("jwks keys capped max_keys=%d total=%d", max_keys, len(doc["keys"]))
            break
        keys[key.kid] = key
    return keys


def _parse_jwk(jwk: Any, algorithms: Collection[str]) -> VerificationKey:
    if not isinstance(jwk, dict):
        raise JWKSError("entry is not an object")
    kid = jwk.get("kid")
    if not valid_kid(kid):
        raise JWKSError("missing or malformed kid")
    if jwk.get("use", "sig") != "sig":
        raise JWKSError("not a signing key (use)")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "OKP" and crv == "Ed25519":
        algorithm, reader = "EdDSA", OKPAlgorithm
    elif kty == "EC" and crv == "P-256":
        algorithm, reader = "ES256", ECAlgorithm
    elif kty == "RSA":
        algorithm, reader = "RS256", RSAAlgorithm
    else:
        raise JWKSError("unsupported key type (only Ed25519, P-256, RSA)")
    if jwk.get("alg", algorithm) != algorithm:
        raise JWKSError("alg does not match the key type")
    if algorithm not in algorithms:
        raise JWKSError(f"algorithm {algorithm} not allowed by auth.algorithms")
    try:
        key = reader.from_jwk(json.dumps(jwk))
    except Exception:  # pyjwt raises several types for bad members; all mean "unusable"
        raise JWKSError("malformed key material") from None
    if hasattr(key, "public_key"):  # private material in a JWKS: use only the public half
        log.warning("jwks key has private material kid=%s; using its public part", kid)
        key = key.public_key()
    if algorithm == "RS256" and key.key_size < MIN_RSA_BITS:
        raise JWKSError(f"RSA key shorter than {MIN_RSA_BITS} bits")
    return VerificationKey(kid=kid, algorithm=algorithm, key=key)


class JWKSSource(Protocol):
    """Where a JWKS document comes from."""

    remote: bool  # True when reading costs a network round trip

    def version(self) -> object:
        """A cheap token that changes when the content may have changed (None if unknown)."""
        ...

    def read(self) -> bytes:
        """The document, or JWKSError."""
        ...


class FileSource:
    """A JWKS on local disk; re-read whenever its stat signature changes."""

    remote = False

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes

    def version(self) -> object:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)

    def read(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                data = f.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise JWKSError(f"file {self.path} does not exist (run: edgeserve keys init)") from None
        except OSError as exc:
            raise JWKSError(f"cannot read {self.path}: {exc.strerror}") from None
        if len(data) > self.max_bytes:
            raise JWKSError(f"file larger than {self.max_bytes} bytes")
        return data

    def __repr__(self) -> str:
        return f"file:{self.path}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could lead to plain HTTP or another host: treat it as a failed fetch."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class URLSource:
    """A JWKS served by an identity provider over HTTPS (HTTP allowed on loopback only)."""

    remote = True

    def __init__(
        self, url: str, timeout_s: float, max_bytes: int, ca_file: Path | None = None
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        # Certificates and host names are always verified; ca_file pins a private CA.
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._opener = urllib.request.build_opener(
            _NoRedirect, urllib.request.HTTPSHandler(context=context)
        )

    def version(self) -> object:
        return None

    def read(self) -> bytes:
        request = urllib.request.Request(
            self.url, headers={"Accept": "application/json", "User-Agent": "edgeserve"}
        )
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                if response.status != 200:
                    raise JWKSError(f"HTTP status {response.status}")
                data = response.read(self.max_bytes + 1)
        except JWKSError:
            raise
        except urllib.error.HTTPError as exc:
            raise JWKSError(f"HTTP status {exc.code}") from None
        except Exception as exc:  # URLError, timeouts, TLS and connection errors alike
            raise JWKSError(f"fetch failed ({type(exc).__name__})") from None
        if len(data) > self.max_bytes:
            raise JWKSError(f"response larger than {self.max_bytes} bytes")
        return data

    def __repr__(self) -> str:
        return f"url:{self.url}"


_NEVER = object()


class KeySet:
    """The trusted keys from one JWKS source, refreshed lazily under a cooldown."""

    def __init__(
        self,
        source: JWKSSource,
        *,
        algorithms: Collection[str],
        max_keys: int,
        cooldown_s: float,
        max_age_s: float,
        file_check_interval_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.algorithms = frozenset(algorithms)
        self.max_keys = max_keys
        self.cooldown_s = cooldown_s
        self.max_age_s = max_age_s
        self.file_check_interval_s = file_check_interval_s
        self.clock = clock
        self.fetches = 0  # reads of the source, successful or not (for tests and metrics)
        # Moves whenever the trusted keys change (added, removed, or new material under a
        # known kid): what was verified under another generation is no longer vouched for.
        self.generation = 0
        self._keys: dict[str, VerificationKey] = {}
        self._seen_version: object = _NEVER
        self._last_attempt: float | None = None
        self._last_success: float | None = None
        self._next_stat_at = -math.inf  # when a file source is due its next stat
        self._changed = False  # that stat saw a new file, not read yet
        self._lock = threading.Lock()

    @property
    def kids(self) -> frozenset[str]:
        """The key ids currently trusted."""
        return frozenset(self._keys)

    def get(self, kid: str) -> VerificationKey | None:
        """The trusted key for `kid`, refreshing first if that is due; None if unknown."""
        if self.refresh_due(kid):
            self.refresh(kid)
        return self._keys.get(kid)

    def refresh_due(self, kid: str | None = None) -> bool:
        """Whether `get(kid)` would read the source now (cheap; no I/O for URLs).

        A file's stat signature is looked at most once per interval: a stat releases the
        GIL, and under load getting it back costs the event loop tens of microseconds,
        which the token cache would otherwise pay on every request (it asks on each)."""
        if not self.source.remote:
            if self._changed:
                return True
            now = self.clock()
            if now < self._next_stat_at:
                return False
            self._next_stat_at = now + self.file_check_interval_s
            self._changed = self.source.version() != self._seen_version
            return self._changed
        now = self.clock()
        if self._last_attempt is not None and now - self._last_attempt < self.cooldown_s:
            return False
        if self._last_success is None or now - self._last_success >= self.max_age_s:
            return True
        return kid is not None and kid not in self._keys

    def refresh(self, kid: str | None = None) -> None:
        """Read the source if still due; on any failure keep the keys we had."""
        with self._lock:  # concurrent callers: one reads, the others find it no longer due
            if not self.refresh_due(kid):
                return
            version = self.source.version()
            self._seen_version = version
            self._changed = False
            self._last_attempt = self.clock()
            self.fetches += 1
            try:
                keys = parse_jwks(self.source.read(), self.algorithms, self.max_keys)
                if not keys:
                    raise JWKSError("no usable signing key")
            except JWKSError as exc:
                log.warning(
                    "jwks refresh failed source=%r reason=%s keeping=%d",
                    self.source,
                    exc,
                    len(self._keys),
                )
                return
            added, removed = keys.keys() - self._keys.keys(), self._keys.keys() - keys.keys()
            changed = keys != self._keys  # VerificationKey equality compares key material
            self._keys = keys
            if changed:  # after the keys: whoever sees the new generation sees the new keys
                self.generation += 1
            self._last_success = self._last_attempt
            if added or removed:
                log.info(
                    "jwks loaded source=%r keys=%d added=%d removed=%d",
                    self.source,
                    len(keys),
                    len(added),
                    len(removed),
                )
