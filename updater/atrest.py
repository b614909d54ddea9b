"""Chunked AES-256-GCM for files at rest (and for bundle payloads in transit).

File layout: a fixed header, then chunks of `chunk_size` plaintext bytes, each sealed
with its own 16-byte tag. Why this shape:

- one AES-GCM call is limited to 2^31-1 bytes and would need the whole file in
  memory; chunks keep memory bounded and allow streaming re-encryption;
- the data key is HKDF(master key, random per-file salt), so no two files share a
  key and a 64-bit random nonce prefix plus a 32-bit chunk counter never repeats;
- every chunk's associated data binds the header (key id, salt, context
  fingerprint), the model name, version and file name, the chunk index and a
  last-chunk flag: reordered, dropped, appended or truncated chunks and files moved
  to another model/version/name all fail authentication;
- the header records the master key id so a rotation can be resumed and a wrong key
  is reported as such rather than as tampering.

Decryption returns bytes in memory; nothing here writes plaintext to disk.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from updater.crashpoints import crash_point
from updater.errors import DecryptionFailed
from updater.fsync import publish
from updater.masterkey import MasterKey

MAGIC = b"ESATRST1"
FORMAT = 1
DEFAULT_CHUNK_BYTES = 64 * 1024
MIN_CHUNK_BYTES = 1024
MAX_CHUNK_BYTES = 16 * 1024 * 1024
TAG_BYTES = 16
# magic, format, chunk size, key id, context fingerprint, salt, nonce prefix
_HEADER = struct.Struct(">8sBI8s8s32s8s")
HEADER_BYTES = _HEADER.size

Keys = MasterKey | Sequence[MasterKey]


@dataclass(frozen=True)
class FileContext:
    """What an encrypted file belongs to; bound into every chunk."""

    model: str
    version: int
    name: str

    def encode(self) -> bytes:
        parts = [self.model.encode(), str(self.version).encode(), self.name.encode()]
        return b"".join(struct.pack(">H", len(p)) + p for p in parts)

    def fingerprint(self) -> bytes:
        return hashlib.sha256(b"edgeserve atrest context\0" + self.encode()).digest()[:8]

    def __str__(self) -> str:
        return f"{self.model}/{self.version}/{self.name}"


@dataclass(frozen=True)
class _Header:
    chunk_size: int
    key_id: str
    context_fp: bytes
    salt: bytes
    nonce_prefix: bytes
    raw: bytes


def _data_key(master: MasterKey, salt: bytes) -> AESGCM:
    hkdf = HKDF(hashes.SHA256(), 32, salt=salt, info=b"edgeserve atrest data key v1")
    return AESGCM(hkdf.derive(master.key))


def _aad(header: bytes, context: FileContext, index: int, last: bool) -> bytes:
    return b"".join(
        (b"edgeserve atrest v1\0", header, context.encode(), struct.pack(">QB", index, last))
    )


def _nonce(prefix: bytes, index: int) -> bytes:
    if index >= 2**32:
        raise ValueError("file too large for one encrypted stream (2^32 chunks)")
    return prefix + struct.pack(">I", index)


def _pieces(blocks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Full `size` pieces, then one final remainder (possibly empty); no quadratic copying."""
    buf = bytearray()
    for block in blocks:
        view = memoryview(block)
        if buf:
            take = size - len(buf)
            buf += view[:take]
            view = view[take:]
            if len(buf) < size:
                continue
            yield bytes(buf)
            buf.clear()
        while len(view) >= size:
            yield bytes(view[:size])
            view = view[size:]
        buf += view
    yield bytes(buf)


def _rechunk(blocks: Iterable[bytes], size: int) -> Iterator[tuple[bytes, bool]]:
    """The pieces of the stream, each flagged whether it is the last (always >= 1 piece)."""
    pieces = _pieces(blocks, size)
    held = next(pieces)
    for piece in pieces:
        if not piece:  # only the final remainder can be empty: `held` ends the stream
            break
        yield held, False
        held = piece
    yield held, True


def encrypt_stream(
    blocks: Iterable[bytes],
    dst: BinaryIO,
    key: MasterKey,
    context: FileContext,
    chunk_size: int = DEFAULT_CHUNK_BYTES,
) -> None:
    """Write the encrypted form of the concatenated `blocks` to `dst`."""
    if not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be in [{MIN_CHUNK_BYTES}, {MAX_CHUNK_BYTES}]")
    salt = secrets.token_bytes(32)
    prefix = secrets.token_bytes(8)
    key_id = bytes.fromhex(key.key_id)
    header = _HEADER.pack(MAGIC, FORMAT, chunk_size, key_id, context.fingerprint(), salt, prefix)
    aead = _data_key(key, salt)
    dst.write(header)
    for index, (plain, last) in enumerate(_rechunk(blocks, chunk_size)):
        aad = _aad(header, context, index, last)
        dst.write(aead.encrypt(_nonce(prefix, index), plain, aad))


def encrypt_bytes(
    data: bytes, key: MasterKey, context: FileContext, chunk_size: int = DEFAULT_CHUNK_BYTES
) -> bytes:
    """The encrypted form of `data`, in memory."""
    out = io.BytesIO()
    encrypt_stream([data], out, key, context, chunk_size)
    return out.getvalue()


def _read_header(src: BinaryIO, what: str) -> _Header:
    raw = src.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES or not raw.startswith(MAGIC):
        raise DecryptionFailed("not_encrypted", f"{what} is not an edgeserve encrypted file")
    _, fmt, chunk_size, key_id, fp, salt, prefix = _HEADER.unpack(raw)
    if fmt != FORMAT or not MIN_CHUNK_BYTES <= chunk_size <= MAX_CHUNK_BYTES:
        raise DecryptionFailed("unsupported", f"{what} has an unsupported encryption header")
    return _Header(chunk_size, key_id.hex(), fp, salt, prefix, raw)


def _pick_key(keys: Keys, header: _Header, what: str) -> MasterKey:
    ring = [keys] if isinstance(keys, MasterKey) else list(keys)
    for key in ring:
        if key.key_id == header.key_id:
            return key
    loaded = ", ".join(k.key_id for k in ring) or "none"
    raise DecryptionFailed(
        "wrong_key",
        f"{what} is encrypted under master key {header.key_id}, which is not loaded "
        f"(loaded: {loaded}); was the master key replaced without rotating the stored files?",
    )


def decrypt_stream(src: BinaryIO, keys: Keys, context: FileContext) -> Iterator[bytes]:
    """Yield the plaintext chunk by chunk; raises DecryptionFailed at the first bad chunk.

    A consumer must discard what it got if an error follows (a later chunk may fail).
    """
    what = f"encrypted file for {context}"
    header = _read_header(src, what)
    key = _pick_key(keys, header, what)
    if header.context_fp != context.fingerprint():
        raise DecryptionFailed(
            "moved",
            f"{what} was encrypted for a different model name, version or file name; "
            "encrypted files cannot be moved or renamed",
        )
    aead = _data_key(key, header.salt)
    size = header.chunk_size + TAG_BYTES
    current = src.read(size)
    index = 0
    while True:
        following = src.read(size)
        last = not following
        aad = _aad(header.raw, context, index, last)
        try:
            plain = aead.decrypt(_nonce(header.nonce_prefix, index), current, aad)
        except InvalidTag:
            raise DecryptionFailed(
                "tampered",
                f"{what}: chunk {index} failed authentication; the file was altered, "
                "truncated, reordered or extended",
            ) from None
        yield plain
        if last:
            return
        current = following
        index += 1


def decrypt_bytes(blob: bytes, keys: Keys, context: FileContext) -> bytes:
    """Plaintext of an encrypted blob held in memory."""
    return b"".join(decrypt_stream(io.BytesIO(blob), keys, context))


def decrypt_to_bytes(
    path: Path, keys: Keys, context: FileContext, max_bytes: int | None = None
) -> bytes:
    """Plaintext of an encrypted file, in memory only (never a plaintext temp file)."""
    out = bytearray()
    with path.open("rb") as src:
        for chunk in decrypt_stream(src, keys, context):
            out += chunk
            if max_bytes is not None and len(out) > max_bytes:
                raise DecryptionFailed("too_large", f"{context} is larger than {max_bytes} bytes")
    return bytes(out)


def file_key_id(path: Path) -> str:
    """The master key id recorded in an encrypted file's header."""
    with path.open("rb") as src:
        return _read_header(src, str(path.name)).key_id


def write_encrypted(path: Path, data: bytes, key: MasterKey, context: FileContext) -> None:
    """Encrypt `data` into a new file, whole or not at all (never replaces a file)."""
    publish(path, lambda dst: encrypt_stream([data], dst, key, context), replace=False)


def rotate_file(path: Path, context: FileContext, keys: Keys, new_key: MasterKey) -> bool:
    """Re-encrypt one file under `new_key`, atomically; False if it already uses it.

    Streams chunk by chunk into a temp file beside it, fsyncs, renames over, fsyncs the
    folder: a crash leaves the file under the old key or the new one, never neither.
    """
    if file_key_id(path) == new_key.key_id:
        return False
    ring = [keys] if isinstance(keys, MasterKey) else list(keys)

    def fill(dst: BinaryIO) -> None:
        with path.open("rb") as src:
            encrypt_stream(decrypt_stream(src, ring, context), dst, new_key, context)
        crash_point("rotate_before_rename")

    publish(path, fill)
    crash_point("rotate_after_rename")
    return True
