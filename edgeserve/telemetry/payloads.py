"""Request bodies kept for debugging, only for models that opt in, sealed at rest.

AES-256-GCM under a per-box key (`<state_dir>/keys/payload.key`, 0600); the request
id, model and version are the associated data, so a sealed body cannot be passed off
as another request's. Sealing happens before the record is queued: plaintext never
reaches SQLite, its WAL or a backup of either. Kept payloads never go upstream.
"""

from __future__ import annotations

import os
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgeserve.telemetry.records import PayloadRecord

NONCE_BYTES = 12


def _associated(request_id: str, model: str, version: str) -> bytes:
    return "\x1f".join((request_id, model, version)).encode()


def seal(key: bytes, request_id: str, model: str, version: str, body: bytes) -> PayloadRecord:
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, body, _associated(request_id, model, version))
    return PayloadRecord(request_id, model, version, nonce, sealed, time.time())


def open_sealed(
    key: bytes, request_id: str, model: str, version: str, nonce: bytes, ciphertext: bytes
) -> bytes:
    """The body; raises cryptography's InvalidTag if anything was changed."""
    return AESGCM(key).decrypt(nonce, ciphertext, _associated(request_id, model, version))
