"""Bundles: one tar holding `manifest.json`, `manifest.sig` and `payload/<file>.enc`.

Create: hash the model files, encrypt each under a fresh data key (the at-rest chunk
format, bound to model/version/name), wrap that key for the recipient, sign the exact
manifest bytes with Ed25519. Verify: everything is checked in memory, in an order that
does the cheap and trust-establishing checks first (the payloads are not even read
until the manifest's signature, model, expiry and version have passed); nothing touches
the store, so a refused bundle leaves it byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import sys
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from updater.atrest import FileContext, decrypt_bytes, encrypt_bytes
from updater.errors import BundleRejected, DecryptionFailed
from updater.fsync import publish
from updater.manifest import (
    FILE_NAME,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    FileEntry,
    Manifest,
    TensorSignature,
    ValidationSample,
    encode_manifest,
    parse_manifest,
)
from updater.masterkey import MasterKey
from updater.signing import TrustedKeys, signing_key_id
from updater.wrapping import Recipient, UnwrapKey, unwrap_data_key, wrap_data_key

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
PAYLOAD_PREFIX = "payload/"
DEFAULT_MAX_BUNDLE_BYTES = 2 * 1024**3
DEFAULT_MAX_FILE_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class BundlePolicy:
    """What this box accepts: who may sign, which keys it holds, how large."""

    trusted_keys: TrustedKeys
    unwrap_keys: Sequence[UnwrapKey] = ()
    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES


@dataclass(frozen=True)
class RawBundle:
    """The members of a bundle tar, read safely into memory, nothing verified yet."""

    manifest_bytes: bytes
    signature: bytes
    payloads: Mapping[str, bytes]  # file name -> encrypted bytes


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature, manifest, limits and digests all checked out."""

    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes
    files: Mapping[str, bytes] = field(repr=False)  # plaintext, in memory only


def _bundle_aad(model: str, version: int) -> bytes:
    return f"edgeserve bundle key v1\0{model}\0{version}".encode()


# -- create ---------------------------------------------------------------------------


def _signature_from_toml(config: dict, key: str) -> tuple[TensorSignature, ...]:  # type: ignore[type-arg]
    return tuple(
        TensorSignature(t["name"], t["datatype"], tuple(t.get("shape", ())))
        for t in config.get(key, [])
    )


def create_bundle(
    model_dir: Path,
    version: int,
    signing_key: Ed25519PrivateKey,
    recipient: Recipient,
    out: Path,
    *,
    samples: Sequence[ValidationSample] = (),
    model: str | None = None,
    expires: datetime | None = None,
    created: datetime | None = None,
) -> Manifest:
    """Build a bundle from `<model_dir>/model.toml` and the files in `<model_dir>/<version>/`.

    The model name defaults to the folder name; backend, inputs and outputs come from
    model.toml. Written to a temp file and renamed, so `out` is never half a bundle.
    """
    name = model or model_dir.name
    config_text = (model_dir / "model.toml").read_text("utf-8")
    config = tomllib.loads(config_text)
    version_dir = model_dir / str(version)
    plain: dict[str, bytes] = {}
    for path in sorted(version_dir.iterdir()):
        if not path.is_file() or path.is_symlink() or not FILE_NAME.match(path.name):
            raise ValueError(f"{path}: only plain files with simple names can be bundled")
        plain[path.name] = path.read_bytes()
    if not plain or len(plain) > MAX_FILES:
        raise ValueError(f"{version_dir} must hold 1..{MAX_FILES} files")
    data_key = MasterKey(secrets.token_bytes(32))
    manifest = Manifest(
        model=name,
        version=version,
        backend=config.get("backend", "auto"),
        created=created or datetime.now(timezone.utc).replace(microsecond=0),
        files=tuple(FileEntry(n, hashlib.sha256(d).hexdigest(), len(d)) for n, d in plain.items()),
        inputs=_signature_from_toml(config, "inputs"),
        outputs=_signature_from_toml(config, "outputs"),
        signing_key_id=signing_key_id(signing_key.public_key()),
        data_key=wrap_data_key(data_key.key, recipient, _bundle_aad(name, version)),
        model_config=config_text,
        samples=tuple(samples),
        expires=expires,
    )
    manifest_bytes = encode_manifest(manifest)
    parse_manifest(manifest_bytes)  # never write a bundle we would refuse to read
    payloads = {
        n: encrypt_bytes(d, data_key, FileContext(name, version, n)) for n, d in plain.items()
    }
    write_bundle(out, manifest_bytes, signing_key.sign(manifest_bytes), payloads)
    return manifest


def write_bundle(
    out: Path, manifest_bytes: bytes, signature: bytes, payloads: Mapping[str, bytes]
) -> None:
    """Write the tar (fixed metadata, manifest first) atomically to `out`."""
    members = [(MANIFEST_NAME, manifest_bytes), (SIGNATURE_NAME, signature)]
    members += [(f"{PAYLOAD_PREFIX}{n}.enc", b) for n, b in sorted(payloads.items())]

    def fill(f: BinaryIO) -> None:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))

    publish(out, fill, mode=0o644)


# -- read and verify ------------------------------------------------------------------


def _member_name(name: str) -> str:
    """Classify a member name, refusing anything that could escape or surprise."""
    parts = PurePosixPath(name).parts
    if name.startswith("/") or "\\" in name or ".." in parts or "" in name.split("/"):
        raise BundleRejected("unsafe_path", f"archive entry {name!r} has an unsafe path")
    if name in (MANIFEST_NAME, SIGNATURE_NAME):
        return name
    if len(parts) == 2 and parts[0] == "payload" and parts[1].endswith(".enc"):
        file_name = parts[1][: -len(".enc")]
        if FILE_NAME.match(file_name):
            return file_name
        raise BundleRejected("unsafe_path", f"archive entry {name!r} has an unsafe file name")
    raise BundleRejected("unexpected_member", f"archive entry {name!r} does not belong in a bundle")


def read_bundle(
    path: Path, max_bundle_bytes: int, max_file_bytes: int, *, payloads: bool = True
) -> RawBundle:
    """Read a bundle's members into memory after the size and tar-safety checks. With
    `payloads` off, payload members are checked (name, kind, size) but not read: a
    bundle's signature is checked before anything an unknown party wrote is held whole
    (an unsigned upload of hundreds of MiB costs the manifest's bytes, not its own)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BundleRejected("unreadable", f"cannot read bundle: {exc.strerror}") from None
    if size > max_bundle_bytes:
        raise BundleRejected(
            "too_large", f"bundle is {size} bytes, over the limit of {max_bundle_bytes}"
        )
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for count, member in enumerate(tar):
                if count >= MAX_FILES + 2:
                    raise BundleRejected("malformed_archive", "bundle has too many entries")
                key = _member_name(member.name)
                if key in found:
                    raise BundleRejected(
                        "duplicate_member", f"archive entry {member.name!r} appears twice"
                    )
                if not member.isreg() or member.issparse():
                    raise BundleRejected(
                        "unsafe_member",
                        f"archive entry {member.name!r} is a link, device, folder or sparse "
                        "file; only regular files are allowed",
                    )
                # Encryption adds a header and 16 bytes per 64 KiB chunk: allow 1/1024 + slack.
                limit = MAX_MANIFEST_BYTES if key == MANIFEST_NAME else max_file_bytes
                limit += limit // 1024 + 4096
                if member.size > limit:
                    raise BundleRejected(
                        "too_large", f"archive entry {member.name!r} is over the size limit"
                    )
                if not payloads and key not in (MANIFEST_NAME, SIGNATURE_NAME):
                    found[key] = b""  # listed, left unread
                    continue
                stream = tar.extractfile(member)
                data = stream.read(member.size) if stream else b""
                if len(data) != member.size:
                    raise BundleRejected("malformed_archive", "bundle is truncated")
                found[key] = data
    except (tarfile.TarError, EOFError, OSError, UnicodeError):
        raise BundleRejected(
            "malformed_archive", "bundle is not a readable tar archive (truncated or corrupt)"
        ) from None
    for required in (MANIFEST_NAME, SIGNATURE_NAME):
        if required not in found:
            raise BundleRejected("missing_member", f"bundle has no {required}")
    manifest_bytes = found.pop(MANIFEST_NAME)
    signature = found.pop(SIGNATURE_NAME)
    return RawBundle(manifest_bytes, signature, found)


def _check_signature(raw: RawBundle, trusted: TrustedKeys) -> Manifest:
    """Signature first, then the manifest: we parse nothing an unknown party wrote."""
    signer = None
    if len(raw.signature) == 64:
        signer = trusted.verifying_key_id(raw.manifest_bytes, raw.signature)
    if signer is None:
        raise BundleRejected(
            "bad_signature",
            "manifest signature does not verify with any trusted key "
            f"(trusted: {', '.join(trusted) or 'none configured'}); "
            "the bundle was signed by another key or altered",
        )
    manifest = parse_manifest(raw.manifest_bytes)
    if manifest.signing_key_id != signer:
        raise BundleRejected(
            "bad_manifest", "manifest names a different signing key than the one that signed it"
        )
    return manifest


def inspect_bundle(
    path: Path, trusted_keys: TrustedKeys, max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
) -> Manifest:
    """The manifest of a bundle whose signature verifies (no decryption, no policy)."""
    raw = read_bundle(path, max_bundle_bytes, max_bundle_bytes, payloads=False)
    return _check_signature(raw, trusted_keys)


def verify_bundle(
    path: Path,
    policy: BundlePolicy,
    *,
    expected_model: str | None = None,
    newest_installed: int | Callable[[str], int] = 0,
    allow_downgrade: bool = False,
    now: datetime | None = None,
) -> VerifiedBundle:
    """Every check short of running the model; returns the plaintext files in memory.

    `newest_installed` is the highest version this box ever installed for the model
    (or a function of the model name giving it): the bundle must be strictly newer
    unless `allow_downgrade` (an audited admin action), against rollback attacks.
    """
    head = read_bundle(path, policy.max_bundle_bytes, policy.max_file_bytes, payloads=False)
    manifest = _check_signature(head, policy.trusted_keys)
    if expected_model is not None and manifest.model != expected_model:
        raise BundleRejected(
            "wrong_model", f"bundle is for model {manifest.model!r}, not {expected_model!r}"
        )
    now = now or datetime.now(timezone.utc)
    if manifest.expires is not None and now >= manifest.expires:
        raise BundleRejected("expired", f"bundle expired at {manifest.expires.isoformat()}")
    if callable(newest_installed):
        newest_installed = newest_installed(manifest.model)
    if manifest.version <= newest_installed and not allow_downgrade:
        raise BundleRejected(
            "not_newer",
            f"bundle version {manifest.version} is not newer than version {newest_installed}, "
            f"the newest ever installed for {manifest.model}; a deliberate downgrade needs "
            "the admin downgrade flag",
        )
    listed = {f.name for f in manifest.files}
    if set(head.payloads) != listed:
        missing = sorted(listed - set(head.payloads))
        extra = sorted(set(head.payloads) - listed)
        raise BundleRejected(
            "missing_member" if missing else "unexpected_member",
            f"payload files do not match the manifest (missing {missing}, extra {extra})",
        )
    for entry in manifest.files:
        if entry.size > policy.max_file_bytes:
            raise BundleRejected(
                "too_large", f"{entry.name} is {entry.size} bytes, over {policy.max_file_bytes}"
            )
    data_key = unwrap_data_key(
        manifest.data_key, policy.unwrap_keys, _bundle_aad(manifest.model, manifest.version)
    )
    if len(data_key) != 32:
        raise BundleRejected("unwrap_failed", "the bundle's data key has the wrong length")
    # Signed by a trusted key and meant for this box: now the payloads are read. The
    # file may have been replaced since; what is opened must be what was verified (and
    # each payload's digest is checked against the signed manifest as it is opened).
    raw = read_bundle(path, policy.max_bundle_bytes, policy.max_file_bytes)
    same = (raw.manifest_bytes, raw.signature) == (head.manifest_bytes, head.signature)
    if not same or set(raw.payloads) != listed:
        raise BundleRejected("changed", "the bundle file changed while it was being verified")
    files = {
        e.name: _open_payload(manifest, e, raw.payloads[e.name], data_key) for e in manifest.files
    }
    return VerifiedBundle(manifest, raw.manifest_bytes, raw.signature, files)


def _open_payload(manifest: Manifest, entry: FileEntry, blob: bytes, data_key: bytes) -> bytes:
    context = FileContext(manifest.model, manifest.version, entry.name)
    try:
        plain = decrypt_bytes(blob, MasterKey(data_key), context)
    except DecryptionFailed as exc:
        raise BundleRejected(
            "decrypt_failed", f"payload {entry.name} does not decrypt: {exc.message}"
        ) from None
    if len(plain) != entry.size or hashlib.sha256(plain).hexdigest() != entry.sha256:
        raise BundleRejected(
            "digest_mismatch", f"payload {entry.name} does not match its SHA-256 in the manifest"
        )
    return plain
