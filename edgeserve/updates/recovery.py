"""One idempotent crash recovery, run at every entry point (each CLI command, server start).

Whatever a SIGKILL or a power cut interrupted is finished or undone here, before the
command or the server looks at the state directory, so that a retry finishes the job
and no person has to repair the box (issue 22). In order:

1. `keys/` (and the master key's folder): temp names of dead writers are removed.
   An *empty* key file is what an older version left when killed while creating it
   (it wrote straight to the final name). It is removed, so that the normal first-use
   path creates a real key, only when nothing can have been protected with it:
   - `master.key` / `master.key.next`: every stored payload names the key it is
     encrypted under; if each one is readable with a key we still hold, the empty file
     protected nothing. Otherwise it is left, and loading it fails loudly (restore the
     file from a backup; a new key could not read those payloads anyway).
   - `audit.key`: the audit log holds no signed checkpoint yet.
   - `device.key`: its public key was printed only after the file was written, so no
     bundle can be encrypted to an empty one.
   A key file of the wrong length that is not empty is never touched: loading it is
   refused loudly, naming the file.
2. `models/<name>/`: the slot store's own recovery under each model's lock: strays
   (temp journal, temp `current` symlinks, temp slots, half-rotated payloads), a
   missing `slots/`, and the journal's pending operation, completed or undone.
3. `incoming/`: upload temp files of dead server processes.

Recovery never fails the command that runs it: a step it cannot do (a read-only state
dir, a permission problem) is logged and the command goes on to fail, or not, on its own.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from edgeserve.audit import chain
from edgeserve.config.loader import Settings
from edgeserve.updates.keyring import (
    device_key_path,
    keys_folder,
    master_key_path,
    next_key_path,
)
from updater import MasterKey, MasterKeyError, SlotStore, TrustedKeys, file_key_id
from updater.bundle import BundlePolicy
from updater.fsync import fsync_dir, remove_strays
from updater.masterkey import parse_key_material

log = logging.getLogger(__name__)

INCOMING = "incoming"
OLD_UPLOAD_PREFIX = "upload-"  # `upload-<hex>.bundle` of earlier versions: no pid to check


def recover_box(settings: Settings) -> list[str]:
    """Run every recovery step; returns one line per thing it changed (also logged)."""
    notes: list[str] = []
    state_dir = settings.server.state_dir
    if not state_dir.is_dir():
        return notes  # a fresh box: nothing was ever interrupted
    for step in (_recover_keys, _recover_models, _recover_incoming):
        try:
            notes += step(settings)
        except PermissionError as exc:  # a user who cannot write here interrupted nothing
            log.debug("recovery step skipped step=%s error=%r", step.__name__, str(exc))
        except (OSError, sqlite3.Error, MasterKeyError) as exc:
            log.warning("recovery step skipped step=%s error=%r", step.__name__, str(exc))
    for note in notes:
        log.warning("recovery %s", note)
    return notes


def _recover_keys(settings: Settings) -> list[str]:
    folders = {keys_folder(settings), master_key_path(settings).parent}
    notes = [f"removed stray {p}" for f in sorted(folders) for p in remove_strays(f)]
    master, pending = master_key_path(settings), next_key_path(settings)
    for path in (pending, master):
        if _is_empty(path) and _nothing_needs_it(settings, path):
            notes.append(_remove(path, "empty master key file, never used"))
    audit_key = chain.key_path(settings.server.state_dir)
    if _is_empty(audit_key) and not _audit_checkpoints(settings.server.state_dir):
        notes.append(_remove(audit_key, "empty audit key file, never used"))
    device = device_key_path(settings)
    if _is_empty(device):
        notes.append(_remove(device, "empty device key file, never used"))
    return notes


def _recover_models(settings: Settings) -> list[str]:
    store = SlotStore(settings.server.state_dir, [], BundlePolicy(TrustedKeys([])))
    store.recover_all()  # logs what it repairs itself, model by model
    return []


def _recover_incoming(settings: Settings) -> list[str]:
    folder = settings.server.state_dir / INCOMING
    removed = remove_strays(folder, also=lambda name: name.startswith(OLD_UPLOAD_PREFIX))
    return [f"removed stray upload {p}" for p in removed]


def _is_empty(path: Path) -> bool:
    """A key file holding nothing but whitespace: never a key, whatever else it was."""
    try:
        return path.is_file() and not path.is_symlink() and not path.read_bytes().strip()
    except PermissionError:
        return False


def _remove(path: Path, why: str) -> str:
    path.unlink()
    fsync_dir(path.parent)
    return f"removed {path} ({why})"


def _nothing_needs_it(settings: Settings, empty: Path) -> bool:
    """True if every stored payload is readable with a master key we still hold."""
    held = set()
    for path in (master_key_path(settings), next_key_path(settings)):
        if path == empty or not path.is_file():
            continue
        try:
            held.add(MasterKey(parse_key_material(path.read_bytes(), str(path))).key_id)
        except MasterKeyError:
            return False  # another broken key: leave everything for the loud refusal
    needed = {file_key_id(p) for p in _payloads(settings.server.state_dir)}
    orphaned = needed - held
    if orphaned:
        log.error(
            "empty master key kept path=%s payload_key_ids=%s: restore it from a backup",
            empty,
            ",".join(sorted(orphaned)),
        )
    return not orphaned


def _payloads(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "models").glob("*/slots/[ab]/payload/*.enc"))


def _audit_checkpoints(state_dir: Path) -> bool:
    """True if the audit log holds a checkpoint signed with the audit key."""
    path = chain.db_path(state_dir)
    if not path.exists():
        return False
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        found = conn.execute("SELECT COUNT(*) FROM meta").fetchone()
    except sqlite3.OperationalError:  # no meta table yet: nothing signed
        return False
    finally:
        conn.close()
    return bool(found and found[0])
