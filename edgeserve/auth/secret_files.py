"""Small per-box secrets (MAC and hashing keys) kept in 0600 files under <state_dir>/keys."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def read_or_create_secret(path: Path, size: int = 32) -> bytes:
    """The secret in `path`; created with O_EXCL at 0600 (and fsynced) on first use.

    When two processes race, the loser reads the winner's file, so both use one key.
    """
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(size)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes()
    with os.fdopen(fd, "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())
    return key
