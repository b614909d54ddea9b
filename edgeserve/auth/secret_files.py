"""Small per-box secrets (MAC and hashing keys) kept in 0600 files under <state_dir>/keys."""

from __future__ import annotations

import secrets
from pathlib import Path

from updater.fsync import write_secret


class KeyFileError(ValueError):
    """A key file exists but does not hold a key of the right length: refused, loudly."""


def read_secret(path: Path, size: int = 32) -> bytes:
    """The key in `path`, refused unless it is exactly `size` bytes (never a short key)."""
    data = path.read_bytes()
    if len(data) != size:
        raise KeyFileError(
            f"{path} holds {len(data)} bytes where a {size}-byte key belongs; refusing to use "
            "it. An empty file left by an interrupted write is removed at start-up when "
            "nothing was protected with it; otherwise restore the file from a backup"
        )
    return data


def read_or_create_secret(path: Path, size: int = 32) -> bytes:
    """The secret in `path`; created whole or not at all (0600, fsynced) on first use.

    When two processes race, the loser reads the winner's file, so both use one key.
    """
    try:
        return read_secret(path, size)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(size)
    try:
        write_secret(path, key)
    except FileExistsError:
        return read_secret(path, size)
    return key
