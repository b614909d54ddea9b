"""A local token issuer for boxes without an identity provider.

`init_keys` writes an Ed25519 signing key (0600) and the public JWKS the server trusts
under `<state_dir>/keys/`; `create_token` signs RFC 9068 access tokens with it.
`rotate_signing_key` makes a new key and keeps the previous public key in the JWKS, so
tokens already handed out stay valid until the operator drops the old key.
Every file is written to a temporary name, fsynced and renamed: the server re-reads the
JWKS when it changes and must never see half of it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgeserve.auth.keyfiles import write_atomic, write_private
from edgeserve.auth.principal import ALL_SCOPES
from edgeserve.errors import Conflict, NotFound
from updater.errors import MasterKeyError
from updater.masterkey import check_private_file

SIGNING_KEY_NAME = "token_signing_key.pem"
JWKS_NAME = "jwks.json"
MAX_TTL_S = 366 * 24 * 3600


def keys_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "keys"


def init_keys(state_dir: Path, *, force: bool = False) -> Path:
    """Create the signing key and its JWKS; returns the JWKS path.

    Refuses (Conflict) if a signing key exists, unless `force`, which replaces it and
    so invalidates every token issued so far.
    """
    folder = keys_dir(state_dir)
    if (folder / SIGNING_KEY_NAME).exists() and not force:
        raise Conflict(f"a token signing key already exists in {folder}")
    key = Ed25519PrivateKey.generate()
    _write_key(folder, key)
    return _write_jwks(folder, [key.public_key()])


def rotate_signing_key(state_dir: Path, *, keep_previous: int = 1) -> str:
    """Sign with a new key from now on; the JWKS keeps `keep_previous` older public keys.

    Returns the new key id. Run again with keep_previous=0 (or once more) to retire
    the old key, which then invalidates the tokens it signed.
    """
    folder = keys_dir(state_dir)
    current = _load_key(folder).public_key()
    older = [k for k in read_public_keys(folder / JWKS_NAME) if _raw(k) != _raw(current)]
    keep = [current, *older][: max(0, keep_previous)]
    key = Ed25519PrivateKey.generate()
    # JWKS first: the server must trust the new key before any token signed by it exists.
    _write_jwks(folder, [key.public_key(), *keep])
    _write_key(folder, key)
    return key_id(key.public_key())


def create_token(
    state_dir: Path,
    scopes: Iterable[str],
    ttl_s: int,
    subject: str,
    issuer: str,
    audience: str,
    *,
    now: int | None = None,
) -> str:
    """A signed RFC 9068 access token (typ at+jwt) for `subject` with `scopes`."""
    scope_set = sorted(set(scopes))
    unknown = set(scope_set) - ALL_SCOPES
    if unknown:
        known = ", ".join(sorted(ALL_SCOPES))
        raise ValueError(f"unknown scope {sorted(unknown)[0]!r} (known: {known})")
    if not scope_set:
        raise ValueError("at least one scope is needed")
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl must be between 1 second and {MAX_TTL_S // 86400} days")
    if not subject:
        raise ValueError("subject must not be empty")
    key = _load_key(keys_dir(state_dir))
    issued_at = int(time.time()) if now is None else now
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": issued_at,
        "exp": issued_at + int(ttl_s),
        "scope": " ".join(scope_set),
        "client_id": "edgeserve-cli",
        "jti": secrets.token_urlsafe(16),
    }
    headers = {"typ": "at+jwt", "kid": key_id(key.public_key())}
    return jwt.encode(claims, key, algorithm="EdDSA", headers=headers)


def key_id(public_key: Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint: a stable id derived from the key itself."""
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": _b64url(_raw(public_key))},
        separators=(",", ":"),
        sort_keys=True,
    )
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def public_jwk(public_key: Ed25519PublicKey) -> dict[str, str]:
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": _b64url(_raw(public_key)),
        "kid": key_id(public_key),
        "alg": "EdDSA",
        "use": "sig",
    }


def read_public_keys(jwks_file: Path) -> list[Ed25519PublicKey]:
    """The Ed25519 keys of a JWKS written by this module (others are skipped)."""
    try:
        doc = json.loads(jwks_file.read_bytes())
    except FileNotFoundError:
        return []
    keys = []
    for jwk in doc.get("keys", []):
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
            raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
            keys.append(Ed25519PublicKey.from_public_bytes(raw))
    return keys


def check_signing_key_mode(state_dir: Path) -> None:
    """Refuse (ValueError naming the fix) a token signing key group or others can read."""
    path = keys_dir(state_dir) / SIGNING_KEY_NAME
    try:
        check_private_file(path, "token signing key file", "the power to mint any token")
    except FileNotFoundError:
        return
    except MasterKeyError as exc:
        raise ValueError(exc.message) from None


def _load_key(folder: Path) -> Ed25519PrivateKey:
    path = folder / SIGNING_KEY_NAME
    check_signing_key_mode(folder.parent)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no token signing key in {folder} (run: edgeserve keys init)") from None
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 key")
    return key


def _write_key(folder: Path, key: Ed25519PrivateKey) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return write_private(folder / SIGNING_KEY_NAME, pem)


def _write_jwks(folder: Path, public_keys: list[Ed25519PublicKey]) -> Path:
    doc = {"keys": [public_jwk(k) for k in public_keys]}
    return write_atomic(folder / JWKS_NAME, (json.dumps(doc, indent=2) + "\n").encode(), 0o644)


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
