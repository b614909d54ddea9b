"""`state.json`: the per-model journal of slots, pending operation, probation and history.

The `current` symlink says what serves; the journal says why, and what was in flight.
A `pending` entry is written before any slot is touched, so recovery after a crash
can tell a finished flip (complete it) from an unfinished one (undo it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from updater.errors import StoreError
from updater.fsync import write_atomic

SLOT_NAMES = ("a", "b")
JOURNAL_FORMAT = 1
MAX_HISTORY = 100


@dataclass(frozen=True)
class SlotRecord:
    """What a complete slot holds."""

    version: int
    manifest_sha256: str
    installed: str


@dataclass(frozen=True)
class Pending:
    """An operation that started but has not been committed to the journal yet."""

    op: str  # "install" | "rollback"
    slot: str  # the slot `current` will point to when it is done
    version: int
    started: str
    reason: str = ""
    downgrade: bool = False


@dataclass(frozen=True)
class Probation:
    """A freshly flipped version that has not been confirmed healthy yet."""

    slot: str
    version: int
    started: str
    boot_count: int = 0


@dataclass(frozen=True)
class HistoryEntry:
    time: str
    event: str  # install, downgrade, confirm, boot, rollback, recovered, aborted, repaired
    version: int | None = None
    slot: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class Journal:
    """The whole state of one model's slot store."""

    model: str
    active: str | None = None
    previous: str | None = None
    pending: Pending | None = None
    slots: dict[str, SlotRecord | None] = field(default_factory=lambda: dict.fromkeys(SLOT_NAMES))
    probation: Probation | None = None
    verdict: str = "none"  # none | probation | confirmed | rolled_back
    versions_seen: int = 0  # highest version ever installed: the anti-rollback floor
    history: tuple[HistoryEntry, ...] = ()

    def version_of(self, slot: str | None) -> int | None:
        record = self.slots.get(slot) if slot else None
        return record.version if record else None

    @property
    def active_version(self) -> int | None:
        return self.version_of(self.active)

    @property
    def previous_version(self) -> int | None:
        return self.version_of(self.previous)

    def with_slot(self, slot: str, record: SlotRecord | None) -> Journal:
        return replace(self, slots={**self.slots, slot: record})

    def logged(
        self, time: str, event: str, version: int | None, slot: str | None, reason: str = ""
    ) -> Journal:
        entry = HistoryEntry(time, event, version, slot, reason)
        return replace(self, history=(*self.history, entry)[-MAX_HISTORY:])

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["format"] = JOURNAL_FORMAT
        data["history"] = [asdict(h) for h in self.history]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Journal:
        if data.pop("format", None) != JOURNAL_FORMAT:
            raise ValueError("unknown journal format")
        slots = {
            s: SlotRecord(**data["slots"][s]) if data["slots"].get(s) else None for s in SLOT_NAMES
        }
        return cls(
            model=data["model"],
            active=data["active"],
            previous=data["previous"],
            pending=Pending(**data["pending"]) if data["pending"] else None,
            slots=slots,
            probation=Probation(**data["probation"]) if data["probation"] else None,
            verdict=data["verdict"],
            versions_seen=data["versions_seen"],
            history=tuple(HistoryEntry(**h) for h in data["history"]),
        )


def commit_install(journal: Journal, pending: Pending, record: SlotRecord, now: str) -> Journal:
    """The journal once an install's flip happened: new active on probation, floor raised."""
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
    return journal.logged(now, event, pending.version, pending.slot, pending.reason)


def commit_rollback(journal: Journal, pending: Pending, now: str) -> Journal:
    """The journal once a rollback's flip happened; the bad slot is no rollback target."""
    bad = journal.active
    journal = replace(
        journal,
        active=pending.slot,
        previous=None,
        pending=None,
        probation=None,
        verdict="rolled_back",
    )
    return journal.logged(now, "rollback", journal.version_of(bad), bad, pending.reason)


def abort_pending(journal: Journal, now: str) -> Journal:
    """The journal once an unfinished operation (no flip happened) has been undone."""
    pending = journal.pending
    if pending is None:
        return journal
    if pending.op == "install":
        journal = journal.with_slot(pending.slot, None)
    return replace(journal, pending=None).logged(
        now, "aborted", pending.version, pending.slot, f"{pending.op} interrupted"
    )


def read_journal(path: Path, model: str) -> Journal:
    """The journal at `path`, or a fresh one if the model was never installed."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Journal(model=model)
    try:
        return Journal.from_json(json.loads(raw))
    except (ValueError, KeyError, TypeError):
        # Atomic writes make this unreachable short of disk corruption or hand edits.
        raise StoreError(f"{path} is corrupt; restore it from the history or reinstall") from None


def write_journal(path: Path, journal: Journal) -> None:
    """Replace the journal atomically (temp, fsync, rename, fsync dir)."""
    write_atomic(path, json.dumps(journal.to_json(), indent=1, sort_keys=True).encode())
