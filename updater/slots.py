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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from updater.bundle import BundlePolicy, VerifiedBundle, inspect_bundle, verify_bundle
from updater.crashpoints import crash_point
from updater.errors import BundleRejected, StoreError
from updater.fsync import fsync_dir, replace_symlink
from updater.journal import (
    SLOT_NAMES,
    Journal,
    Pending,
    SlotRecord,
    abort_pending,
    commit_install,
    commit_rollback,
    read_journal,
    write_journal,
)
from updater.manifest import MODEL_NAME, Manifest
from updater.masterkey import MasterKey
from updater.slotfiles import (
    MANIFEST_FILE,
    current_slot,
    read_manifest,
    read_slot,
    remove_slot,
    remove_strays,
    rotate_slot,
    slot_record,
    write_slot,
)

log = logging.getLogger(__name__)

Validator = Callable[[Mapping[str, bytes], Manifest], None]
"""Loads the model files (plaintext, in memory) and runs the manifest's samples; raises if bad."""


@dataclass(frozen=True)
class InstallResult:
    """What an install did: the new version is active and on probation."""

    model: str
    version: int
    slot: str
    previous_version: int | None
    downgrade: bool
    journal_error: str | None = None
    """Set when the flip happened but the journal could not be written (disk full):
    the new version is active and the next command's recovery records it."""
    already_installed: bool = False
    """A retried install found this very bundle active already: nothing was written."""


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
        self.root = state_dir / "models"
        # keys[0] encrypts; any of them decrypts (rotation in progress). No key at all is
        # a store that can show status and recover, but not install or decrypt.
        self.keys = keys
        self.policy = policy
        self.max_unconfirmed_boots = max_unconfirmed_boots
        self.clock = clock

    # -- folders, locking, recovery -----------------------------------------------------

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
        if not folder.is_dir() and not create:
            raise StoreError(f"no model named {name!r} is installed")
        if create and not (folder / "slots").is_dir():
            # Each level is made and made durable on its own: a kill between two of
            # these leaves a prefix that the next run completes (no `slots/`, issue 22).
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder.mkdir(mode=0o700, exist_ok=True)
            fsync_dir(self.root)
            (folder / "slots").mkdir(mode=0o700, exist_ok=True)
            fsync_dir(folder)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield folder
        finally:
            os.close(fd)

    def _recover(self, name: str, folder: Path) -> Journal:
        """Bring journal and slots in line with `current` after any crash; idempotent.

        Writes nothing when there is nothing to fix, so opening a healthy store (or
        refusing a bundle) leaves it byte-for-byte unchanged.
        """
        journal = before = read_journal(folder / "state.json", name)
        for stray in remove_strays(folder):
            log.warning("updater removed stray model=%s path=%s", name, stray)
        if not (folder / "slots").is_dir():
            (folder / "slots").mkdir(mode=0o700)
            fsync_dir(folder)
            log.warning("updater recreated model=%s path=%s", name, folder / "slots")
        current = current_slot(folder)
        now = self._stamp()
        pending = journal.pending
        if pending is not None and current == pending.slot:  # flipped: finish the job
            pending = replace(pending, reason=f"{pending.reason} (completed after a crash)".strip())
            if pending.op == "install":
                record = slot_record(folder / "slots" / pending.slot, now)
                journal = commit_install(journal, pending, record, now)
            else:
                journal = commit_rollback(journal, pending, now)
        elif pending is not None:  # not flipped: undo it
            if pending.op == "install":
                remove_slot(folder / "slots" / pending.slot)
            journal = abort_pending(journal, now)
        if current != journal.active:
            journal = replace(journal, active=current, probation=None).logged(
                now, "repaired", journal.version_of(current), current, "journal followed current"
            )
        for slot in SLOT_NAMES:
            slot_dir = folder / "slots" / slot
            complete = (slot_dir / MANIFEST_FILE).is_file()
            if journal.slots[slot] is None and complete and slot == current:
                journal = journal.with_slot(slot, slot_record(slot_dir, now))
            elif journal.slots[slot] is None and slot_dir.exists() and slot != current:
                remove_slot(slot_dir)  # half-written or orphaned: never serve it
            elif journal.slots[slot] is not None and not complete:
                journal = journal.with_slot(slot, None)
        if journal.previous and journal.slots[journal.previous] is None:
            journal = replace(journal, previous=None)
        if journal != before:
            log.warning("updater recovered model=%s active=%s", name, journal.active)
            write_journal(folder / "state.json", journal)
        return journal

    # -- reading ------------------------------------------------------------------------

    def model_names(self) -> list[str]:
        """Models that have (or had) an installed version."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "state.json").is_file())

    def recover_all(self) -> list[str]:
        """Run crash recovery on every model folder (each under its lock); returns names.

        Every entry point runs this before anything else, so whatever a kill or a power
        cut interrupted is finished or undone before the next command looks at it.
        """
        if not self.root.is_dir():
            return []
        done = []
        for folder in sorted(self.root.iterdir()):
            if folder.is_dir() and MODEL_NAME.match(folder.name):
                with self._locked(folder.name) as locked:
                    self._recover(folder.name, locked)
                done.append(folder.name)
        return done

    def _encrypting_key(self) -> MasterKey:
        if not self.keys:
            raise StoreError("no at-rest master key is loaded; cannot write a model")
        return self.keys[0]

    def state(self, name: str) -> Journal:
        """The journal of one model, after recovering from any interrupted operation."""
        with self._locked(name) as folder:
            return self._recover(name, folder)

    def load_current(self, name: str) -> tuple[Manifest, dict[str, bytes]]:
        """The serving version's manifest and plaintext files, decrypted into memory."""
        with self._locked(name, shared=True) as folder:
            slot = current_slot(folder)
            if slot is None:
                raise StoreError(f"model {name!r} has no installed version")
            return read_slot(folder / "slots" / slot, name, self.keys)

    # -- install ------------------------------------------------------------------------

    def install(
        self,
        bundle: Path,
        *,
        validate: Validator,
        model: str | None = None,
        allow_downgrade: bool = False,
        reason: str = "",
        retry_ok: bool = False,
    ) -> InstallResult:
        """Verify, validate, write the idle slot, flip; the new version starts on probation.

        Everything that can refuse the bundle runs before the first write, so a refused
        bundle (BundleRejected) leaves the store byte-for-byte unchanged. Validation runs
        on the verified plaintext in memory, for the same reason.

        With `retry_ok`, the very bundle that is already active is not refused as
        not newer: a command retried after a kill that came after its flip succeeds
        (`already_installed`), which is what "a retry finishes the job" means.
        """
        try:
            verified = verify_bundle(
                bundle,
                self.policy,
                expected_model=model,
                newest_installed=self._versions_seen,
                allow_downgrade=allow_downgrade,
                now=self.clock(),
            )
        except BundleRejected as exc:
            done = self._already_active(bundle) if retry_ok and exc.reason == "not_newer" else None
            if done is None:
                raise
            return done
        manifest = verified.manifest
        try:
            validate(verified.files, manifest)
        except BundleRejected:
            raise
        except Exception as exc:
            raise BundleRejected(
                "validation_failed", f"version {manifest.version} failed validation: {exc}"
            ) from None
        with self._locked(manifest.model, create=True) as folder:
            journal = self._recover(manifest.model, folder)
            if manifest.version <= journal.versions_seen and not allow_downgrade:
                raise BundleRejected(
                    "not_newer", f"version {manifest.version} was installed meanwhile"
                )
            return self._install_locked(folder, journal, verified, allow_downgrade, reason)

    def _already_active(self, bundle: Path) -> InstallResult | None:
        """An InstallResult if `bundle` (signature verified) is exactly what serves now."""
        manifest = inspect_bundle(bundle, self.policy.trusted_keys, self.policy.max_bundle_bytes)
        journal = self.state(manifest.model)
        if journal.active is None:
            return None
        active, _ = read_manifest(self._dir(manifest.model) / "slots" / journal.active)
        if active != manifest:
            return None
        return InstallResult(
            manifest.model,
            manifest.version,
            journal.active,
            journal.previous_version,
            False,
            already_installed=True,
        )

    def _versions_seen(self, name: str) -> int:
        return self.state(name).versions_seen if self._dir(name).is_dir() else 0

    def _install_locked(
        self, folder: Path, journal: Journal, verified: VerifiedBundle, downgrade: bool, reason: str
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
            remove_slot(folder / "slots" / idle)
            tmp = folder / "slots" / f".tmp-{idle}"
            write_slot(tmp, verified, self._encrypting_key())
            os.rename(tmp, folder / "slots" / idle)
            fsync_dir(folder / "slots")
            read_slot(folder / "slots" / idle, manifest.model, self.keys)  # read back
        except Exception:
            self._recover(manifest.model, folder)  # undo: drop the pending install
            raise
        crash_point("before_flip")
        replace_symlink(folder / "current", f"slots/{idle}")
        crash_point("after_flip")
        digest = hashlib.sha256(verified.manifest_bytes).hexdigest()
        previous_version = journal.active_version
        journal = commit_install(journal, pending, SlotRecord(manifest.version, digest, now), now)
        journal_error = None
        try:
            write_journal(folder / "state.json", journal)
        except OSError as exc:
            # The flip happened: the new version is what serves. The journal still says
            # "pending install into <idle>", which recovery completes at the next entry
            # point; report that truthfully instead of a failure (issue 22, item 8).
            journal_error = exc.strerror or str(exc)
            log.error("updater journal not written model=%s error=%r", manifest.model, exc)
        log.info(
            "updater installed model=%s version=%s slot=%s", manifest.model, pending.version, idle
        )
        crash_point("during_probation")
        return InstallResult(
            manifest.model, manifest.version, idle, previous_version, downgrade, journal_error
        )

    # -- probation and rollback ---------------------------------------------------------

    def confirm(self, name: str) -> Journal:
        """The version on probation is healthy: keep it (ends the boot counter)."""
        with self._locked(name) as folder:
            journal = self._recover(name, folder)
            if journal.probation is None:
                return journal
            journal = replace(journal, probation=None, verdict="confirmed").logged(
                self._stamp(), "confirm", journal.active_version, journal.active
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
            now = self._stamp()
            version, slot = journal.active_version, journal.active
            if count <= self.max_unconfirmed_boots:
                probation = replace(journal.probation, boot_count=count)
                journal = replace(journal, probation=probation).logged(now, "boot", version, slot)
            elif journal.previous is not None:
                why = f"{count - 1} boots without confirmation"
                return self._rollback_locked(folder, journal, why)
            else:
                why = f"{count - 1} boots without confirmation; no previous version to restore"
                journal = replace(journal, probation=None, verdict="unhealthy")
                journal = journal.logged(now, "unhealthy", version, slot, why)
            write_journal(folder / "state.json", journal)
            return journal

    def rollback(self, name: str, reason: str) -> Journal:
        """Flip back to the previous slot now (health watch verdict, or by hand)."""
        with self._locked(name) as folder:
            return self._rollback_locked(folder, self._recover(name, folder), reason)

    def _rollback_locked(self, folder: Path, journal: Journal, reason: str) -> Journal:
        target = journal.previous
        record = journal.slots[target] if target else None
        if target is None or record is None:
            raise StoreError(f"{journal.model} has no previous version to roll back to")
        pending = Pending("rollback", target, record.version, self._stamp(), reason)
        write_journal(folder / "state.json", replace(journal, pending=pending))
        crash_point("rollback_before_flip")
        replace_symlink(folder / "current", f"slots/{target}")
        crash_point("rollback_after_flip")
        journal = commit_rollback(replace(journal, pending=pending), pending, pending.started)
        write_journal(folder / "state.json", journal)
        log.warning(
            "updater rolled back model=%s to version=%s reason=%r",
            journal.model,
            record.version,
            reason,
        )
        return journal

    # -- key rotation -------------------------------------------------------------------

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
                    if journal.slots[slot] is not None:
                        rewritten += rotate_slot(folder / "slots" / slot, name, keys, new_key)
        self.keys = keys
        return rewritten
