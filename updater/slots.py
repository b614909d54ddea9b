"""The dual-slot store: `<state_dir>/models/<name>/{slots/a,slots/b,current,state.json}`.

Install writes the idle slot (never `current`), fsyncs it, reads it back, and only
then flips `current` with rename(2). The journal records a `pending` operation before
any slot is touched, so `_recover` can always tell a finished flip from an unfinished
one: a SIGKILL or power cut at any instant leaves the old or the new version serving,
whole, and a journal that agrees with `current`.

Payloads stay encrypted at rest (under the master key, see `atrest`); plaintext only
ever exists in memory. The updater does not run models: the caller's `validate`
callback does (the server loads them in its real runtime).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from updater.atrest import FileContext, decrypt_to_bytes, encrypt_stream, rotate_file
from updater.bundle import BundlePolicy, VerifiedBundle, verify_bundle
from updater.crashpoints import crash_point
from updater.errors import BundleRejected, StoreError
from updater.fsync import fsync_dir, replace_symlink
from updater.journal import (
    SLOT_NAMES,
    Journal,
    Pending,
    Probation,
    SlotRecord,
    read_journal,
    write_journal,
)
from updater.manifest import MODEL_NAME, Manifest, parse_manifest
from updater.masterkey import MasterKey

log = logging.getLogger(__name__)

Validator = Callable[[Mapping[str, bytes], Manifest], None]
"""Loads the model files (plaintext, in memory) and runs the manifest's samples; raises if bad."""

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
PAYLOAD_DIR = "payload"


@dataclass(frozen=True)
class InstallResult:
    """What an install did: the new version is active and on probation."""

    model: str
    version: int
    slot: str
    previous_version: int | None
    downgrade: bool


def _create(path: Path) -> BinaryIO:
    """A new file only the service user can read (manifests hold sample data too)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class SlotStore:
    """Install, flip, confirm and roll back model versions under one state directory."""

    def __init__(
        self,
        state_dir: Path,
        master_keys: MasterKey | Sequence[MasterKey],
        policy: BundlePolicy,
        *,
        max_unconfirmed_boots: int = 3,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        keys = [master_keys] if isinstance(master_keys, MasterKey) else list(master_keys)
        if not keys:
            raise StoreError("the slot store needs at least one master key")
        self.root = state_dir / "models"
        self.keys = keys  # keys[0] encrypts; any of them decrypts (rotation in progress)
        self.policy = policy
        self.max_unconfirmed_boots = max_unconfirmed_boots
        self.clock = clock

    # -- paths and locking ------------------------------------------------------------

    def _dir(self, name: str) -> Path:
        if not MODEL_NAME.match(name):
            raise StoreError(f"{name!r} is not a valid model name")
        return self.root / name

    def _stamp(self) -> str:
        return self.clock().astimezone(timezone.utc).isoformat().replace("+00:00", "Z")

    @contextlib.contextmanager
    def _locked(self, name: str, *, create: bool = False, shared: bool = False) -> Iterator[Path]:
        """One writer per model (flock, released by the kernel if we die); readers share."""
        folder = self._dir(name)
        if not folder.is_dir():
            if not create:
                raise StoreError(f"no model named {name!r} is installed")
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.mkdir(mode=0o700, exist_ok=True)
            (folder / "slots").mkdir(mode=0o700, exist_ok=True)
            fsync_dir(folder)
            fsync_dir(folder.parent)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield folder
        finally:
            os.close(fd)

    def _current_slot(self, folder: Path) -> str | None:
        try:
            target = os.readlink(folder / "current")
        except FileNotFoundError:
            return None
        slot = Path(target).name
        return slot if slot in SLOT_NAMES and target == f"slots/{slot}" else None

    # -- recovery -----------------------------------------------------------------------

    def _recover(self, name: str, folder: Path) -> Journal:
        """Bring journal and slots in line with `current` after any crash; idempotent.

        Writes nothing when there is nothing to fix, so opening a healthy store (or
        refusing a bundle) leaves it byte-for-byte unchanged.
        """
        path = folder / "state.json"
        journal = read_journal(path, name)
        before = journal
        slots_dir = folder / "slots"
        for stray in [*slots_dir.glob(".tmp-*"), *folder.glob(".*.tmp")]:
            shutil.rmtree(stray) if stray.is_dir() else stray.unlink()
        for stray in slots_dir.glob("*/payload/.*.rotating"):
            stray.unlink()
        current = self._current_slot(folder)
        now = self._stamp()
        pending = journal.pending
        if pending is not None and current == pending.slot and pending.op == "install":
            record = self._slot_record(folder, pending.slot, now)
            journal = self._commit_install(journal, pending, record, now, "completed after a crash")
        elif pending is not None and current == pending.slot:
            journal = self._commit_rollback(journal, pending, now, "completed after a crash")
        elif pending is not None:
            if pending.op == "install":
                self._remove_slot(folder, pending.slot)
                journal = journal.with_slot(pending.slot, None)
            journal = replace(journal, pending=None).logged(
                now, "aborted", pending.version, pending.slot, f"{pending.op} interrupted"
            )
        if current != journal.active and journal.pending is None:
            journal = replace(journal, active=current, probation=None).logged(
                now, "repaired", journal.version_of(current), current, "journal followed current"
            )
        for slot in SLOT_NAMES:
            exists = (slots_dir / slot / MANIFEST_FILE).is_file()
            if journal.slots[slot] is None and exists and slot == current:
                journal = journal.with_slot(slot, self._slot_record(folder, slot, now))
            elif journal.slots[slot] is None and (slots_dir / slot).exists() and slot != current:
                self._remove_slot(folder, slot)  # half-written or orphaned: never serve it
            elif journal.slots[slot] is not None and not exists:
                journal = journal.with_slot(slot, None)
        if journal.previous and journal.slots[journal.previous] is None:
            journal = replace(journal, previous=None)
        if journal != before:
            log.warning("updater recovered model=%s active=%s", name, journal.active)
            write_journal(path, journal)
        return journal

    def _remove_slot(self, folder: Path, slot: str) -> None:
        target = folder / "slots" / slot
        if target.exists():
            shutil.rmtree(target)
            fsync_dir(target.parent)

    def _slot_record(self, folder: Path, slot: str, now: str) -> SlotRecord:
        raw = (folder / "slots" / slot / MANIFEST_FILE).read_bytes()
        version = parse_manifest(raw).version
        return SlotRecord(version, hashlib.sha256(raw).hexdigest(), now)

    def _commit_install(
        self, journal: Journal, pending: Pending, record: SlotRecord, now: str, reason: str
    ) -> Journal:
        old = journal.active if journal.active != pending.slot else None
        journal = replace(
            journal.with_slot(pending.slot, record),
            active=pending.slot,
            previous=old,
            pending=None,
            versions_seen=max(journal.versions_seen, pending.version),
            probation=Probation(pending.slot, pending.version, now),
            verdict="probation",
        )
        event = "downgrade" if pending.downgrade else "install"
        return journal.logged(now, event, pending.version, pending.slot, reason or pending.reason)

    def _commit_rollback(self, journal: Journal, pending: Pending, now: str, why: str) -> Journal:
        bad = journal.active
        journal = replace(journal, active=pending.slot, previous=None, pending=None, probation=None)
        journal = replace(journal, verdict="rolled_back")
        reason = f"{pending.reason} ({why})" if why else pending.reason
        return journal.logged(now, "rollback", journal.version_of(bad), bad, reason)

    # -- public operations ------------------------------------------------------------

    def model_names(self) -> list[str]:
        """Models that have (or had) an installed version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "state.json").is_file())

    def state(self, name: str) -> Journal:
        """The journal of one model, after recovering from any interrupted operation."""
        with self._locked(name) as folder:
            return self._recover(name, folder)

    def install(
        self,
        bundle: Path,
        *,
        validate: Validator,
        model: str | None = None,
        allow_downgrade: bool = False,
        reason: str = "",
    ) -> InstallResult:
        """Verify, validate, write the idle slot, flip; the new version starts on probation.

        Everything that can refuse the bundle runs before the first write, so a refused
        bundle (BundleRejected) leaves the store byte-for-byte unchanged. Validation runs
        on the verified plaintext in memory, for the same reason.
        """
        verified = verify_bundle(
            bundle,
            self.policy,
            expected_model=model,
            newest_installed=self._versions_seen,
            allow_downgrade=allow_downgrade,
            now=self.clock(),
        )
        name = verified.manifest.model
        try:
            validate(verified.files, verified.manifest)
        except BundleRejected:
            raise
        except Exception as exc:
            raise BundleRejected(
                "validation_failed", f"version {verified.manifest.version} failed validation: {exc}"
            ) from None
        with self._locked(name, create=True) as folder:
            journal = self._recover(name, folder)
            version = verified.manifest.version
            if version <= journal.versions_seen and not allow_downgrade:
                raise BundleRejected("not_newer", f"version {version} was installed meanwhile")
            return self._install_locked(folder, journal, verified, allow_downgrade, reason)

    def _versions_seen(self, name: str) -> int:
        if not self._dir(name).is_dir():
            return 0
        return self.state(name).versions_seen

    def _install_locked(
        self,
        folder: Path,
        journal: Journal,
        verified: VerifiedBundle,
        downgrade: bool,
        reason: str,
    ) -> InstallResult:
        manifest = verified.manifest
        idle = "b" if journal.active == "a" else "a"
        now = self._stamp()
        pending = Pending("install", idle, manifest.version, now, reason, downgrade)
        # The idle slot's old content (the rollback target) is about to go: say so first.
        journal = replace(
            journal.with_slot(idle, None),
            pending=pending,
            previous=None if journal.previous == idle else journal.previous,
        )
        write_journal(folder / "state.json", journal)
        try:
            self._remove_slot(folder, idle)
            tmp = folder / "slots" / f".tmp-{idle}"
            self._write_slot(tmp, verified)
            os.rename(tmp, folder / "slots" / idle)
            fsync_dir(folder / "slots")
            self._read_slot(folder, idle, manifest.model)  # read back what we will serve
        except Exception:
            self._recover(manifest.model, folder)  # undo: drop the pending install
            raise
        crash_point("before_flip")
        replace_symlink(folder / "current", f"slots/{idle}")
        crash_point("after_flip")
        record = SlotRecord(
            manifest.version, hashlib.sha256(verified.manifest_bytes).hexdigest(), now
        )
        previous_version = journal.active_version
        journal = self._commit_install(journal, pending, record, now, reason)
        write_journal(folder / "state.json", journal)
        log.info(
            "updater installed model=%s version=%s slot=%s", manifest.model, manifest.version, idle
        )
        crash_point("during_probation")
        return InstallResult(manifest.model, manifest.version, idle, previous_version, downgrade)

    def _write_slot(self, tmp: Path, verified: VerifiedBundle) -> None:
        """Write a complete slot into a temp folder, then make every byte of it durable."""
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
                encrypt_stream([verified.files[entry.name]], dst, self.keys[0], context)
            written.append(path)
            crash_point("during_write")
        crash_point("after_write")
        for path in written:
            with path.open("rb") as f:
                os.fsync(f.fileno())
        fsync_dir(tmp / PAYLOAD_DIR)
        fsync_dir(tmp)
        crash_point("after_fsync")

    def _read_slot(self, folder: Path, slot: str, name: str) -> tuple[Manifest, dict[str, bytes]]:
        slot_dir = folder / "slots" / slot
        manifest = parse_manifest((slot_dir / MANIFEST_FILE).read_bytes())
        if manifest.model != name:
            raise StoreError(f"slot {slot} of {name} holds model {manifest.model}")
        files = {}
        for entry in manifest.files:
            context = FileContext(name, manifest.version, entry.name)
            path = slot_dir / PAYLOAD_DIR / f"{entry.name}.enc"
            data = decrypt_to_bytes(path, self.keys, context, max_bytes=entry.size)
            if hashlib.sha256(data).hexdigest() != entry.sha256:
                raise StoreError(f"{name} version {manifest.version}: {entry.name} is damaged")
            files[entry.name] = data
        return manifest, files

    def load_current(self, name: str) -> tuple[Manifest, dict[str, bytes]]:
        """The serving version's manifest and plaintext files, decrypted into memory."""
        with self._locked(name, shared=True) as folder:
            slot = self._current_slot(folder)
            if slot is None:
                raise StoreError(f"model {name!r} has no installed version")
            return self._read_slot(folder, slot, name)

    def confirm(self, name: str) -> Journal:
        """The version on probation is healthy: keep it (ends the boot counter)."""
        with self._locked(name) as folder:
            journal = self._recover(name, folder)
            if journal.probation is None:
                return journal
            now = self._stamp()
            journal = replace(journal, probation=None, verdict="confirmed").logged(
                now, "confirm", journal.active_version, journal.active
            )
            write_journal(folder / "state.json", journal)
            return journal

    def record_boot(self, name: str) -> Journal:
        """Count a start while on probation; roll back after too many unconfirmed boots.

        The server calls this once per process start, before loading the model: a
        version that keeps crashing the process is never confirmed, so the counter
        climbs until it is rolled back (the RAUC/Mender boot-counter scheme).
        """
        with self._locked(name) as folder:
            journal = self._recover(name, folder)
            if journal.probation is None:
                return journal
            count = journal.probation.boot_count + 1
            if count > self.max_unconfirmed_boots:
                why = f"{count - 1} boots without confirmation"
                if journal.previous is not None:
                    return self._rollback_locked(folder, journal, why)
                journal = replace(journal, probation=None, verdict="unhealthy").logged(
                    self._stamp(),
                    "unhealthy",
                    journal.active_version,
                    journal.active,
                    f"{why}; no previous version to roll back to",
                )
                write_journal(folder / "state.json", journal)
                return journal
            journal = replace(journal, probation=replace(journal.probation, boot_count=count))
            journal = journal.logged(self._stamp(), "boot", journal.active_version, journal.active)
            write_journal(folder / "state.json", journal)
            return journal

    def rollback(self, name: str, reason: str) -> Journal:
        """Flip back to the previous slot now (health watch verdict, or by hand)."""
        with self._locked(name) as folder:
            return self._rollback_locked(folder, self._recover(name, folder), reason)

    def _rollback_locked(self, folder: Path, journal: Journal, reason: str) -> Journal:
        target = journal.previous
        if target is None or journal.slots[target] is None:
            raise StoreError(f"{journal.model} has no previous version to roll back to")
        now = self._stamp()
        pending = Pending("rollback", target, journal.slots[target].version, now, reason)
        journal = replace(journal, pending=pending)
        write_journal(folder / "state.json", journal)
        crash_point("rollback_before_flip")
        replace_symlink(folder / "current", f"slots/{target}")
        crash_point("rollback_after_flip")
        journal = self._commit_rollback(journal, pending, now, "")
        write_journal(folder / "state.json", journal)
        log.warning(
            "updater rolled back model=%s to version=%s reason=%r",
            journal.model,
            pending.version,
            reason,
        )
        return journal

    def rotate_master_key(self, new_key: MasterKey) -> int:
        """Re-encrypt every stored payload under `new_key`; returns files rewritten.

        Each file is replaced atomically and names its key in its header, so an
        interrupted rotation leaves every file readable with the old or the new key,
        and running it again finishes the job.
        """
        keys = [new_key, *(k for k in self.keys if k.key_id != new_key.key_id)]
        rewritten = 0
        for name in self.model_names():
            with self._locked(name) as folder:
                journal = self._recover(name, folder)
                for slot in SLOT_NAMES:
                    if journal.slots[slot] is None:
                        continue
                    slot_dir = folder / "slots" / slot
                    manifest = parse_manifest((slot_dir / MANIFEST_FILE).read_bytes())
                    for entry in manifest.files:
                        context = FileContext(name, manifest.version, entry.name)
                        path = slot_dir / PAYLOAD_DIR / f"{entry.name}.enc"
                        rewritten += rotate_file(path, context, keys, new_key)
        self.keys = keys
        return rewritten
