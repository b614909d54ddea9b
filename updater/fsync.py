"""Durable file operations: the one way any file or link of ours comes to exist.

`publish` makes a file or symlink appear at its final name whole or not at all: it is
built under a unique temp name (`.<name>.<pid>-<hex>.tmp`) in the same folder, fsynced,
renamed (or, for a create-only key, hard-linked) onto the final name, and then the
folder is fsynced. rename(2) alone is atomic against a crash of the process, but
without the fsyncs a power cut can leave the new name pointing at an empty file, or
the rename itself undone. Readers see old or new, never a torn or empty file.

A process killed mid-way leaves only its temp name behind. `remove_strays` removes
temp names whose writer is dead (the pid in the name), whatever they are (file,
folder or symlink: a symlink is unlinked, never followed), so it is safe to run
while another live process is writing beside it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
"""Our temp names: the final name, the writer's pid, a random tag."""


def fsync_dir(path: Path) -> None:
    """Make the directory entries (creates, renames, unlinks) in `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data and metadata that was written without an open handle."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A fresh temp name beside `path` that `remove_strays` recognises once we are dead."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def publish(
    path: Path,
    fill: Callable[[BinaryIO], object] | None = None,
    *,
    link_to: str | None = None,
    mode: int = 0o600,
    replace: bool = True,
) -> None:
    """Make `path` exist atomically and durably: a file `fill` writes, or a symlink.

    With `replace=False` an existing `path` is never touched (FileExistsError), and the
    final name still never exists half-written: hard-linking the finished temp file
    onto it fails atomically if someone else got there first.
    """
    if (fill is None) == (link_to is None):
        raise ValueError("publish needs exactly one of fill and link_to")
    tmp = temp_name(path)
    try:
        if link_to is not None:
            os.symlink(link_to, tmp)
        else:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(tmp, flags, mode)
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), mode)  # exact, whatever the umask
                assert fill is not None
                fill(f)
                f.flush()
                os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path, follow_symlinks=False)
            os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash or power cut leaves old or new content."""
    publish(path, lambda f: f.write(data), mode=mode)


def replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` atomically (a new symlink beside it, renamed over it)."""
    publish(link, link_to=target)


def write_secret(path: Path, data: bytes) -> None:
    """Create a new 0600 key file, whole or not at all; never replaces an existing one."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        publish(path, lambda f: f.write(data), mode=0o600, replace=False)
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; refusing to overwrite a key") from None


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_path(path: Path) -> None:
    """Remove a file, symlink or folder; a symlink is unlinked, never followed."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def remove_strays(folder: Path, *, also: Callable[[str], bool] | None = None) -> list[Path]:
    """Remove our temp names in `folder` whose writer is dead; returns what was removed.

    `also` names other leftovers the caller knows are strays (for example a temp slot
    folder, which the caller's lock already proves nobody is writing).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        dead = match is not None and not _writer_alive(int(match["pid"]))
        if dead or (also is not None and also(entry.name)):
            remove_path(Path(entry.path))
            removed.append(Path(entry.path))
    if removed:
        fsync_dir(folder)
    return removed
