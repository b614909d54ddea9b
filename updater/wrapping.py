"""Wrapping a bundle's random data key for its target: a fleet key or one device.

- fleet: a shared 32-byte secret; the data key is sealed with AES-256-GCM under it.
- device: the device's X25519 public key; an ephemeral X25519 exchange, HKDF-SHA256
  and AES-256-GCM (ECIES), so only the holder of the device's private key can open it.

The model name and version are bound as associated data, so a wrapped key cannot be
lifted into another bundle's manifest.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from updater.errors import BundleRejected
from updater.fsync import write_secret
from updater.masterkey import check_private_file, key_id_of, parse_key_material

FLEET = "fleet-aes256gcm"
DEVICE = "x25519-hkdf-sha256-aes256gcm"
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


@dataclass(frozen=True)
class FleetKey:
    """A symmetric key shared by a fleet of boxes (both wraps and unwraps)."""

    key: bytes = field(repr=False)

    @property
    def key_id(self) -> str:
        return key_id_of(self.key, b"fleet")

    @classmethod
    def generate(cls) -> FleetKey:
        return cls(secrets.token_bytes(32))

    def text(self) -> str:
        return base64.b64encode(self.key).decode()


@dataclass(frozen=True)
class DevicePublicKey:
    """What a bundle author needs to encrypt for one device."""

    public: X25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id_of(self.public.public_bytes(*_RAW), b"x25519")

    def text(self) -> str:
        return base64.b64encode(self.public.public_bytes(*_RAW)).decode()

    @classmethod
    def from_text(cls, text: str) -> DevicePublicKey:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
            return cls(X25519PublicKey.from_public_bytes(raw))
        except (binascii.Error, ValueError):
            raise ValueError("device key: expected base64 of a 32-byte X25519 key") from None


@dataclass(frozen=True)
class DeviceKey:
    """A device's X25519 private key (stays on the box)."""

    private: X25519PrivateKey = field(repr=False)

    @property
    def public_key(self) -> DevicePublicKey:
        return DevicePublicKey(self.private.public_key())

    @property
    def key_id(self) -> str:
        return self.public_key.key_id

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(X25519PrivateKey.generate())

    def text(self) -> str:
        raw = self.private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return base64.b64encode(raw).decode()


Recipient = FleetKey | DevicePublicKey
UnwrapKey = FleetKey | DeviceKey


def read_unwrap_key(path: Path) -> UnwrapKey:
    """A bundle decryption key file: `fleet:<base64>` or `x25519:<base64>` (mode 0600)."""
    check_private_file(path, "bundle key file")
    kind, _, body = path.read_text("ascii").strip().partition(":")
    material = parse_key_material(body.encode(), str(path))
    if kind == "fleet":
        return FleetKey(material)
    if kind == "x25519":
        return DeviceKey(X25519PrivateKey.from_private_bytes(material))
    raise ValueError(f"{path}: expected 'fleet:<base64>' or 'x25519:<base64>'")


def unwrap_key_text(key: UnwrapKey) -> str:
    """The file form read by `read_unwrap_key`."""
    return f"fleet:{key.text()}" if isinstance(key, FleetKey) else f"x25519:{key.text()}"


def generate_unwrap_key_file(path: Path, kind: str) -> UnwrapKey:
    """Create a fleet key or this device's X25519 key in a new 0600 file."""
    key: UnwrapKey
    if kind == "fleet":
        key = FleetKey.generate()
    elif kind == "x25519":
        key = DeviceKey.generate()
    else:
        raise ValueError("kind must be 'fleet' or 'x25519'")
    write_secret(path, (unwrap_key_text(key) + "\n").encode())
    return key


@dataclass(frozen=True)
class WrappedKey:
    """A data key sealed for one recipient, as stored in the (signed) manifest."""

    scheme: str
    key_id: str
    nonce: str
    wrapped: str
    ephemeral: str | None = None


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _device_kek(shared: bytes, ephemeral: bytes, device: bytes) -> AESGCM:
    hkdf = HKDF(hashes.SHA256(), 32, salt=ephemeral + device, info=b"edgeserve bundle wrap v1")
    return AESGCM(hkdf.derive(shared))


def wrap_data_key(data_key: bytes, recipient: Recipient, aad: bytes) -> WrappedKey:
    """Seal `data_key` so only `recipient` can open it."""
    nonce = secrets.token_bytes(12)
    if isinstance(recipient, FleetKey):
        sealed = AESGCM(recipient.key).encrypt(nonce, data_key, aad)
        return WrappedKey(FLEET, recipient.key_id, _b64(nonce), _b64(sealed))
    ephemeral = X25519PrivateKey.generate()
    eph_raw = ephemeral.public_key().public_bytes(*_RAW)
    dev_raw = recipient.public.public_bytes(*_RAW)
    kek = _device_kek(ephemeral.exchange(recipient.public), eph_raw, dev_raw)
    sealed = kek.encrypt(nonce, data_key, aad)
    return WrappedKey(DEVICE, recipient.key_id, _b64(nonce), _b64(sealed), _b64(eph_raw))


def unwrap_data_key(wrapped: WrappedKey, keys: Sequence[UnwrapKey], aad: bytes) -> bytes:
    """Open the data key with whichever of our keys it was wrapped for."""
    key = next((k for k in keys if k.key_id == wrapped.key_id), None)
    if key is None:
        raise BundleRejected(
            "not_for_this_device",
            f"the bundle is encrypted for key {wrapped.key_id}, which this box does not hold",
        )
    try:
        nonce = base64.b64decode(wrapped.nonce, validate=True)
        sealed = base64.b64decode(wrapped.wrapped, validate=True)
        if isinstance(key, FleetKey) and wrapped.scheme == FLEET:
            return AESGCM(key.key).decrypt(nonce, sealed, aad)
        if isinstance(key, DeviceKey) and wrapped.scheme == DEVICE and wrapped.ephemeral:
            eph_raw = base64.b64decode(wrapped.ephemeral, validate=True)
            shared = key.private.exchange(X25519PublicKey.from_public_bytes(eph_raw))
            kek = _device_kek(shared, eph_raw, key.public_key.public.public_bytes(*_RAW))
            return kek.decrypt(nonce, sealed, aad)
    except (InvalidTag, ValueError, binascii.Error):
        pass
    raise BundleRejected("unwrap_failed", "the bundle's data key could not be unwrapped")
