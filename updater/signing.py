"""Ed25519 signing keys for bundles: create, store (0600), parse trusted public keys.

Trusted keys come from `[updater] trusted_keys` as base64 of the 32 raw bytes (what
`public_key_text` prints) or as PEM; a key id is a short hash of the raw public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from updater.fsync import write_secret
from updater.masterkey import check_private_file

_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def signing_key_id(public: Ed25519PublicKey) -> str:
    """Short, printable name of a signing key: hash of its raw public bytes."""
    raw = public.public_bytes(*_RAW)
    return hashlib.sha256(b"edgeserve signing key\0" + raw).digest()[:8].hex()


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as one base64 line, the form `[updater] trusted_keys` takes."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return base64.b64encode(public.public_bytes(*_RAW)).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A trusted key from base64 (32 raw bytes) or PEM; ValueError says what is wrong."""
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(stripped.encode())
        except ValueError:
            raise ValueError("trusted key: not a valid PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("trusted key: only Ed25519 public keys are accepted")
        return key
    try:
        raw = base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("trusted key: not base64 and not PEM") from None
    if len(raw) != 32:
        raise ValueError(f"trusted key: an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create a signing key as PKCS#8 PEM with mode 0600; never overwrites."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_secret(path, pem)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read a signing key, refusing a file that group or others can read."""
    check_private_file(path, "signing key file")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


class TrustedKeys(Mapping[str, Ed25519PublicKey]):
    """The public keys a bundle may be signed with, by key id."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {signing_key_id(k): k for k in keys}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> TrustedKeys:
        return cls(parse_public_key(t) for t in texts)

    def __getitem__(self, key_id: str) -> Ed25519PublicKey:
        return self._keys[key_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def verifying_key_id(self, data: bytes, signature: bytes) -> str | None:
        """The id of the trusted key that signed `data`, or None."""
        for key_id, key in self._keys.items():
            try:
                key.verify(signature, data)
            except InvalidSignature:
                continue
            return key_id
        return None
