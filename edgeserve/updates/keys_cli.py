"""Update keys, added to the auth colleague's `edgeserve keys` group (see edgeserve/cli/group.py).

- `keys bundle-signing-key PATH`: the author's Ed25519 key; prints the trusted_keys line.
- `keys fleet-key PATH`: a shared fleet key that bundles are encrypted for.
- `keys device-key`: this box's own X25519 key; prints the public key for authors.
- `keys master-init`: the at-rest master key (0600), as the server creates on first start.
- `keys rotate`: re-encrypt every stored model under a new master key, no downtime.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from edgeserve.audit.offline import audit_command
from edgeserve.cli.options import CONFIG_OPTION, fail, load_or_exit
from edgeserve.updates.keyring import (
    bundle_policy,
    device_key_path,
    load_master_keys,
    master_key_path,
    next_key_path,
)
from updater import (
    DeviceKey,
    MasterKeyError,
    SlotStore,
    UpdaterError,
    generate_master_key_file,
    generate_signing_key,
    generate_unwrap_key_file,
    public_key_text,
    read_master_key_file,
)
from updater.fsync import fsync_dir

PATH_ARG = click.argument("path", type=click.Path(dir_okay=False, path_type=Path))


@click.command("bundle-signing-key")
@PATH_ARG
def bundle_signing_key(path: Path) -> None:
    """Create an Ed25519 bundle signing key (0600) and print its public key.

    \b
    Example: edgeserve keys bundle-signing-key ~/keys/bundle-signing.pem
    """
    try:
        key = generate_signing_key(path)
    except (FileExistsError, OSError) as exc:
        fail(str(exc))
    click.echo(f"signing key: {path}")
    click.echo("add to [updater] trusted_keys on every box:")
    click.echo(public_key_text(key))


@click.command("fleet-key")
@PATH_ARG
def fleet_key(path: Path) -> None:
    """Create a fleet key file (0600): bundles for the fleet are encrypted to it.

    \b
    Example: edgeserve keys fleet-key /etc/edgeserve/fleet.key
    """
    try:
        generate_unwrap_key_file(path, "fleet")
    except (FileExistsError, OSError) as exc:
        fail(str(exc))
    click.echo(f"fleet key: {path} (copy it to each box and list it in bundle_key_files)")


@click.command("device-key")
@CONFIG_OPTION
def device_key(config_path: Path | None) -> None:
    """Create (or show) this box's X25519 key in <state_dir>/keys/device.key.

    \b
    Example: edgeserve keys device-key   # prints the public key for bundle authors
    """
    settings = load_or_exit(config_path)
    path = device_key_path(settings)
    try:
        from updater import read_unwrap_key

        key = read_unwrap_key(path) if path.exists() else generate_unwrap_key_file(path, "x25519")
    except (UpdaterError, ValueError, OSError) as exc:
        fail(str(exc))
    if not isinstance(key, DeviceKey):
        fail(f"{path} is not a device key")
    click.echo(f"device key: {path}")
    click.echo(f"public key (bundle create --recipient): {key.public_key.text()}")


@click.command("master-init")
@CONFIG_OPTION
def master_init(config_path: Path | None) -> None:
    """Create the at-rest master key file (0600) at [updater] master_key_file.

    \b
    Example: edgeserve keys master-init
    """
    settings = load_or_exit(config_path)
    path = master_key_path(settings)
    try:
        if path.exists():  # a retry after a kill, or a second run: never overwritten
            key = read_master_key_file(path)
            click.echo(f"master key: {path} (id {key.key_id}) already exists; kept")
            return
        key = generate_master_key_file(path)
    except (MasterKeyError, OSError) as exc:
        fail(str(exc))
    click.echo(f"master key: {path} (id {key.key_id})")


@click.command("rotate")
@CONFIG_OPTION
def rotate(config_path: Path | None) -> None:
    """Re-encrypt every stored model under a new master key, while the server runs.

    The new key is written as <key file>.next first; both keys are loaded while it
    exists, so an interrupted rotation loses nothing and running it again finishes.

    \b
    Example: edgeserve keys rotate
    """
    settings = load_or_exit(config_path)
    path = master_key_path(settings)
    pending = next_key_path(settings)
    if not path.exists():
        fail(
            f"no master key file at {path}: rotation works on a key file; a key from a "
            "systemd credential or the environment is rotated by replacing it there"
        )
    try:
        keys = load_master_keys(settings)
        new = read_master_key_file(pending) if pending.exists() else None
        if new is None:
            new = generate_master_key_file(pending)
            keys.insert(0, new)
        store = SlotStore(settings.server.state_dir, keys, bundle_policy(settings))
        rewritten = store.rotate_master_key(new)
        rewritten += store.rotate_master_key(new)  # a slot written meanwhile with the old key
        os.replace(pending, path)
        fsync_dir(path.parent)
    except (UpdaterError, ValueError, OSError) as exc:
        fail(f"rotation interrupted, run it again: {exc}")
    audit_command(settings, "keys.rotate_master", new.key_id, "ok", {"files_rewritten": rewritten})
    click.echo(f"rotated: {rewritten} files re-encrypted under master key {new.key_id}")


KEY_COMMANDS = [bundle_signing_key, fleet_key, device_key, master_init, rotate]
