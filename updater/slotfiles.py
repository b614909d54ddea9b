"""What one slot folder holds on disk, and how it is written, read, rotated and removed.

A slot is `manifest.json` (the signed bytes as received), `manifest.sig`, and
`payload/<file>.enc` (the model files, encrypted under the at-rest master key).
A slot is written in a temp folder and renamed into place only when every byte is
durable, so a folder named `a` or `b` is either complete or being deleted.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from updater.atrest import FileContext, Keys, decrypt_to_bytes, encrypt_stream, rotate_file
from updater.bundle import VerifiedBundle
from updater.crashpoints import crash_point
from updater.errors import StoreError
from updater.fsync import fsync_dir, remove_path
from updater.fsync import remove_strays as remove_strays_in
from updater.journal import SLOT_NAMES, SlotRecord
from updater.manifest import Manifest, parse_manifest
from updater.masterkey import MasterKey

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
PAYLOAD_DIR = "payload"


def _create(path: Path) -> BinaryIO:
    """A new file only the service user can read (manifests hold sample data too)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def current_slot(folder: Path) -> str | None:
    """The slot `<folder>/current` points at, or None if there is no (valid) pointer."""
    try:
        target = os.readlink(folder / "current")
    except FileNotFoundError:
        return None
    slot = Path(target).name
    return slot if slot in SLOT_NAMES and target == f"slots/{slot}" else None


def write_slot(tmp: Path, verified: VerifiedBundle, key: MasterKey) -> None:
    """Write a complete slot into the temp folder `tmp`, then make every byte durable."""
    manifest = verified.manifest
    tmp.mkdir(mode=0o700)
    (tmp / PAYLOAD_DIR).mkdir(mode=0o700)
    written = [tmp / MANIFEST_FILE, tmp / SIGNATURE_FILE]
    for path, data in zip(written, (verified.manifest_bytes, verified.signature), strict=True):
        with _create(path) as dst:
            dst.write(data)
    for entry in manifest.files:
        path = tmp / PAYLOAD_DIR / f"{entry.name}.enc"
        context = FileContext(manifest.model, manifest.version, entry.name)
        with _create(path) as dst:
            encrypt_stream([verified.files[entry.name]], dst, key, context)
        written.append(path)
        crash_point("during_write")
    crash_point("after_write")
    for path in written:
        with path.open("rb") as f:
            os.fsync(f.fileno())
    fsync_dir(tmp / PAYLOAD_DIR)
    fsync_dir(tmp)
    crash_point("after_fsync")


def read_manifest(slot_dir: Path) -> tuple[Manifest, bytes]:
    raw = (slot_dir / MANIFEST_FILE).read_bytes()
    return parse_manifest(raw), raw


def read_slot(slot_dir: Path, model: str, keys: Keys) -> tuple[Manifest, dict[str, bytes]]:
    """The slot's manifest and plaintext files, decrypted into memory and digest-checked."""
    manifest, _ = read_manifest(slot_dir)
    if manifest.model != model:
        raise StoreError(f"slot {slot_dir.name} of {model} holds model {manifest.model}")
    files = {}
    for entry in manifest.files:
        context = FileContext(model, manifest.version, entry.name)
        path = slot_dir / PAYLOAD_DIR / f"{entry.name}.enc"
        data = decrypt_to_bytes(path, keys, context, max_bytes=entry.size)
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise StoreError(f"{model} version {manifest.version}: {entry.name} is damaged")
        files[entry.name] = data
    return manifest, files


def slot_record(slot_dir: Path, installed: str) -> SlotRecord:
    """The journal's record of a complete slot, rebuilt from its manifest."""
    manifest, raw = read_manifest(slot_dir)
    return SlotRecord(manifest.version, hashlib.sha256(raw).hexdigest(), installed)


def remove_slot(slot_dir: Path) -> None:
    """Delete a slot folder (never `current`'s) and make the deletion durable."""
    if slot_dir.exists() or slot_dir.is_symlink():
        remove_path(slot_dir)
        fsync_dir(slot_dir.parent)


def _old_temp_name(name: str) -> bool:
    """Fixed temp names of earlier versions (`.current.tmp`, `.state.json.tmp`)."""
    return name in (".current.tmp", ".state.json.tmp")


def remove_strays(folder: Path) -> list[Path]:
    """Temp slots, temp journal/pointer files and half-rotated payloads left by a crash.

    Runs under the model's exclusive lock, so a temp slot (`.tmp-a`) or an old fixed
    temp name is a leftover for sure; a `current` temp is a symlink and is unlinked,
    never followed or rmtree'd.
    """
    slots = folder / "slots"
    removed = remove_strays_in(folder, also=_old_temp_name)
    removed += remove_strays_in(slots, also=lambda name: name.startswith(".tmp-"))
    for payload in slots.glob(f"*/{PAYLOAD_DIR}"):
        removed += remove_strays_in(payload, also=lambda name: name.endswith(".rotating"))
    return removed


def rotate_slot(slot_dir: Path, model: str, keys: Keys, new_key: MasterKey) -> int:
    """Re-encrypt a slot's payload files under `new_key`; returns how many were rewritten."""
    manifest, _ = read_manifest(slot_dir)
    rewritten = 0
    for entry in manifest.files:
        context = FileContext(model, manifest.version, entry.name)
        path = slot_dir / PAYLOAD_DIR / f"{entry.name}.enc"
        rewritten += rotate_file(path, context, keys, new_key)
    return rewritten
