"""The at-rest master key: where it comes from, how it is stored, how it is named.

Sources in order of preference: a key file that only its owner can read, a systemd
credential (`$CREDENTIALS_DIRECTORY/<name>`, decrypted by systemd from the TPM or
host key), then an environment variable (least preferred: visible in /proc to the
same user). The key id is a short hash, safe to print, recorded in every file header.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from updater.errors import MasterKeyError
from updater.fsync import write_secret

KEY_BYTES = 32
DEFAULT_CREDENTIAL = "edgeserve-master-key"
DEFAULT_ENV = "EDGESERVE_MASTER_KEY"


def key_id_of(material: bytes, purpose: bytes = b"master") -> str:
    """A 16-hex-digit name for a key: stable, printable, reveals nothing useful."""
    return hashlib.sha256(b"edgeserve key id\0" + purpose + b"\0" + material).digest()[:8].hex()


@dataclass(frozen=True)
class MasterKey:
    """32 secret bytes plus where they came from; never shown in a repr."""

    key: bytes = field(repr=False)
    source: str = field(default="memory", compare=False)

    def __post_init__(self) -> None:
        if len(self.key) != KEY_BYTES:
            raise MasterKeyError(f"a master key is {KEY_BYTES} bytes, got {len(self.key)}")

    @property
    def key_id(self) -> str:
        return key_id_of(self.key)

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(secrets.token_bytes(KEY_BYTES), source="generated")


def parse_key_material(raw: bytes, where: str) -> bytes:
    """32 key bytes from base64 text (the format we write) or exactly 32 raw bytes."""
    text = raw.strip()
    if not text:
        raise MasterKeyError(
            f"{where} is empty. An empty key file left by an interrupted write is removed "
            "at start-up only while no stored model can be encrypted under it; restore "
            "the key from a backup"
        )
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        try:
            decoded = base64.urlsafe_b64decode(text)
        except (binascii.Error, ValueError):
            decoded = b""
    if len(decoded) == KEY_BYTES:
        return decoded
    if len(raw) == KEY_BYTES:
        return raw
    raise MasterKeyError(
        f"{where} must hold a {KEY_BYTES}-byte key as base64 (44 characters); "
        "generate a new key file rather than editing one by hand"
    )


def check_private_file(
    path: Path, what: str = "master key file", exposes: str = "every stored model"
) -> None:
    """Refuse a secret file that group or others could read or write, and say how to fix it.

    The one mode check for every key file the box reads (master, bundle, signing and
    token signing keys, audit.key): `exposes` says what a reader of it would get."""
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise MasterKeyError(f"{what} {path} is not a regular file")
    loose = st.st_mode & 0o077
    if loose:
        raise MasterKeyError(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or other users can "
            f"access it, and with it {exposes}. Fix: chmod 600 {path} "
            "(and chown it to the service user)"
        )


def read_master_key_file(path: Path) -> MasterKey:
    """Load a key file after checking that only its owner can read it."""
    check_private_file(path)
    return MasterKey(parse_key_material(path.read_bytes(), str(path)), source=f"file:{path}")


def load_master_key(
    file: Path | None = None,
    *,
    credential: str | None = DEFAULT_CREDENTIAL,
    env_var: str | None = DEFAULT_ENV,
    environ: Mapping[str, str] | None = None,
) -> MasterKey:
    """The master key from the first source that has one: file, systemd credential, env.

    A file that exists but is group/other accessible is an error, not skipped: falling
    through to a weaker source would hide the misconfiguration.
    """
    env = os.environ if environ is None else environ
    if file is not None and file.exists():
        return read_master_key_file(file)
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if credential and cred_dir:
        path = Path(cred_dir) / credential
        if path.is_file():
            material = parse_key_material(path.read_bytes(), f"systemd credential {credential}")
            return MasterKey(material, source=f"credential:{credential}")
    if env_var and env.get(env_var):
        material = parse_key_material(env[env_var].encode(), f"environment variable {env_var}")
        return MasterKey(material, source=f"env:{env_var}")
    tried = [f"file {file}" if file else None]
    tried.append(f"credential {credential}" if credential and cred_dir else None)
    tried.append(f"environment variable {env_var}" if env_var else None)
    raise MasterKeyError(
        "no at-rest master key found (tried: "
        + ", ".join(t for t in tried if t)
        + "); create a key file (mode 0600) at [updater] master_key_file"
    )


def generate_master_key_file(path: Path) -> MasterKey:
    """Create a new key file with mode 0600; never overwrites an existing key."""
    key = MasterKey.generate()
    try:
        write_secret(path, base64.b64encode(key.key) + b"\n")
    except FileExistsError as exc:
        raise MasterKeyError(str(exc)) from None
    return MasterKey(key.key, source=f"file:{path}")
