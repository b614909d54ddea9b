"""The slot store as configured: master keys, bundle policy, and where keys live.

Shared by the server and the CLI, so `edgeserve update apply` with the server stopped
writes exactly the store the server will read.

Master key rotation (`edgeserve keys rotate`) writes the new key beside the old one as
`<master key file>.next` first; while that file exists both keys are loaded and the new
one encrypts, so an interrupted rotation leaves every file readable and a rerun resumes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edgeserve.config.loader import Settings
from updater import (
    BundlePolicy,
    MasterKey,
    MasterKeyError,
    SlotStore,
    TrustedKeys,
    generate_master_key_file,
    load_master_key,
    read_master_key_file,
    read_unwrap_key,
)
from updater.wrapping import UnwrapKey

log = logging.getLogger(__name__)

DEVICE_KEY_NAME = "device.key"


def keys_folder(settings: Settings) -> Path:
    return settings.server.state_dir / "keys"


def master_key_path(settings: Settings) -> Path:
    """[updater] master_key_file, default `<state_dir>/keys/master.key`."""
    return settings.updater.master_key_file or keys_folder(settings) / "master.key"


def next_key_path(settings: Settings) -> Path:
    path = master_key_path(settings)
    return path.with_name(path.name + ".next")


def device_key_path(settings: Settings) -> Path:
    return keys_folder(settings) / DEVICE_KEY_NAME


def _has_installed_models(settings: Settings) -> bool:
    root = settings.server.state_dir / "models"
    return root.is_dir() and any((p / "state.json").is_file() for p in root.iterdir())


def load_master_keys(settings: Settings, *, create: bool = False) -> list[MasterKey]:
    """The key ring: [next, current] during a rotation, else [current].

    With `create`, a box with no key anywhere and no installed model gets a new key
    file (0600) at the configured path, as on first start. A key file that group or
    others can read raises MasterKeyError, whatever other source exists.
    """
    u = settings.updater
    path = master_key_path(settings)
    credential = u.master_key_credential or None
    env_var = u.master_key_env or None
    try:
        key = load_master_key(path, credential=credential, env_var=env_var)
    except MasterKeyError:
        if not create or path.exists() or _has_installed_models(settings):
            raise
        if _other_source_configured(credential, env_var):
            raise
        key = generate_master_key_file(path)
        log.info("created at-rest master key file=%s", path)
    keys = [key]
    pending = next_key_path(settings)
    if pending.exists():
        keys.insert(0, read_master_key_file(pending))
    return keys


def _other_source_configured(credential: str | None, env_var: str | None) -> bool:
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    return bool((credential and cred_dir) and (Path(cred_dir) / credential).exists()) or bool(
        env_var and os.environ.get(env_var)
    )


def unwrap_keys(settings: Settings) -> list[UnwrapKey]:
    """[updater] bundle_key_files, plus this device's own key if it has one."""
    paths = list(settings.updater.bundle_key_files)
    device = device_key_path(settings)
    if device.exists() and device not in paths:
        paths.append(device)
    return [read_unwrap_key(p) for p in paths]


def bundle_policy(settings: Settings) -> BundlePolicy:
    u = settings.updater
    return BundlePolicy(
        TrustedKeys.from_texts(u.trusted_keys),
        unwrap_keys(settings),
        max_bundle_bytes=u.max_bundle_bytes,
        max_file_bytes=u.max_file_bytes,
    )


def open_store(settings: Settings, *, create_key: bool = False, need_key: bool = True) -> SlotStore:
    """The dual-slot store under `<state_dir>`; MasterKeyError/ValueError if keys are bad.

    Without `need_key`, a box with no usable master key gets a store that can show its
    status and recover, but not install or decrypt (status needs no key, issue 22).
    """
    try:
        keys = load_master_keys(settings, create=create_key)
    except MasterKeyError:
        if need_key:
            raise
        keys = []
    return SlotStore(
        settings.server.state_dir,
        keys,
        bundle_policy(settings),
        max_unconfirmed_boots=settings.updater.max_unconfirmed_boots,
    )
