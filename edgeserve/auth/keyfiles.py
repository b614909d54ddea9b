"""Write key material so that no reader ever sees half a file or a readable secret.

The server re-reads the JWKS whenever it changes, so a torn write would be read; and a
private key chmod-ed after writing is readable for a moment: both are avoided by the one
atomic primitive (`updater.fsync.publish`: unique temp, fsync, rename, fsync folder).
"""

from __future__ import annotations

from pathlib import Path

from updater.fsync import write_atomic as _publish_bytes


def write_private(path: Path, data: bytes) -> Path:
    """A secret: mode 0600 from its first byte, in a folder created 0700."""
    return write_atomic(path, data, 0o600)


def write_atomic(path: Path, data: bytes, mode: int) -> Path:
    """Temp file in the same folder, fsync, rename over `path`, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _publish_bytes(path, data, mode)
    return path
