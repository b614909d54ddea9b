"""Admission of new jobs: an active-job slot reserved before the upload is read, and the
disk uploads may fill (per subject, in all, and a free-space floor on the disk).

The slot is taken synchronously on the event loop (check and count with no `await`
between), so concurrent uploads cannot all pass a check made before any of them was
stored. Disk use is what the job folders hold (inputs, results, row errors) plus the
bytes of uploads still arriving, checked chunk by chunk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgeserve.errors import InsufficientStorage, Overloaded


class JobSlots:
    """At most `limit` jobs queued, running, or being uploaded at once."""

    def __init__(self, count_active: Callable[[], int], limit: int) -> None:
        self._count_active = count_active
        self._limit = limit
        self._reserved = 0

    def acquire(self) -> None:
        """Take a slot (429 if none is free); `release` it once the job is stored (the
        store counts it from then on) or refused."""
        if self._count_active() + self._reserved >= self._limit:
            raise Overloaded(
                f"{self._limit} jobs are already queued, running or uploading; retry later",
                headers={"Retry-After": "60"},
            )
        self._reserved += 1

    def release(self) -> None:
        self._reserved -= 1


@dataclass(frozen=True)
class DiskBounds:
    max_subject_bytes: int
    max_total_bytes: int
    min_free_bytes: int


@dataclass(frozen=True)
class JobAdmission:
    """What a new job must get before its body is read: a slot, then disk."""

    slots: JobSlots
    uploads: UploadBudget


class UploadBudget:
    """Disk the job uploads may use; `open` one `Upload` per request, `take` each chunk."""

    def __init__(self, jobs_dir: Path, bounds: DiskBounds) -> None:
        self.jobs_dir = jobs_dir
        self.bounds = bounds
        self._arriving: dict[str, int] = {}

    def usage(self, subject_jobs: Iterable[str]) -> tuple[int, int]:
        """(bytes in this subject's job folders, bytes in all job folders); reads the disk."""
        sizes = {entry.name: _folder_bytes(Path(entry.path)) for entry in _folders(self.jobs_dir)}
        return sum(sizes.get(job_id, 0) for job_id in subject_jobs), sum(sizes.values())

    def open(self, subject: str, usage: tuple[int, int], declared: int | None) -> Upload:
        upload = Upload(self, subject, *usage)
        if declared:
            upload.check(declared)
        return upload

    def _arriving_total(self) -> int:
        return sum(self._arriving.values())


class Upload:
    """One upload's share of the budget; `close` (always) gives its arriving bytes back."""

    def __init__(self, budget: UploadBudget, subject: str, subject_used: int, total_used: int):
        self._budget = budget
        self._subject = subject
        self._subject_used = subject_used
        self._total_used = total_used
        self._taken = 0

    def check(self, more: int) -> None:
        """Refuse (507) if `more` bytes would pass a quota or the free-space floor."""
        budget, bounds = self._budget, self._budget.bounds
        subject = self._subject_used + budget._arriving.get(self._subject, 0) + more
        if subject > bounds.max_subject_bytes:
            raise InsufficientStorage(
                f"your jobs would hold more than {bounds.max_subject_bytes} bytes "
                "([jobs] max_subject_bytes); delete finished jobs or retry later"
            )
        if self._total_used + budget._arriving_total() + more > bounds.max_total_bytes:
            raise InsufficientStorage(
                f"jobs would hold more than {bounds.max_total_bytes} bytes "
                "([jobs] max_total_bytes); retry later"
            )
        if _free_bytes(budget.jobs_dir) - more < bounds.min_free_bytes:
            raise InsufficientStorage(
                "the server's disk is nearly full ([jobs] min_free_bytes); retry later"
            )

    def take(self, n: int) -> None:
        self.check(n)
        arriving = self._budget._arriving
        arriving[self._subject] = arriving.get(self._subject, 0) + n
        self._taken += n

    def close(self) -> None:
        arriving = self._budget._arriving
        left = arriving.get(self._subject, 0) - self._taken
        if left > 0:
            arriving[self._subject] = left
        else:
            arriving.pop(self._subject, None)
        self._taken = 0


def _folders(root: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(root) as entries:
            return [e for e in entries if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # removed by the runner meanwhile
                total += os.lstat(os.path.join(path, name)).st_size
    return total


def _free_bytes(path: Path) -> int:
    """Free bytes for an unprivileged writer on the disk that holds `path`."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
