"""The backup and restore commands of packaging/README.md, on a box laid out under a
temporary root: the state and config survive the loss of the disk, a token issued before
the backup still works after the restore, and key files keep their owner-only modes."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serving import MODELS, run_server

README = Path(__file__).resolve().parent.parent / "packaging" / "README.md"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tar") is None, reason="tar not installed"),
]


def readme_command(prefix: str) -> list[str]:
    """The documented command starting with `prefix`, so the test runs what the docs say."""
    for line in README.read_text().splitlines():
        line = line.strip()
        if line.startswith(f"sudo {prefix}"):
            return line.removeprefix("sudo ").split("#", 1)[0].split()
    raise AssertionError(f"packaging/README.md shows no `sudo {prefix}...` command")


def run_on_root(command: list[str], root: Path, cwd: Path) -> None:
    """Run a documented command with `-C /` pointing at the temporary root instead."""
    command = [str(root) if part == "/" else part for part in command]
    subprocess.run(command, check=True, cwd=cwd, timeout=120)


def test_backup_and_restore_keep_keys_tokens_and_modes(tmp_path: Path) -> None:
    root = tmp_path / "box"
    config_dir = root / "etc" / "edgeserve"
    state_dir = root / "var" / "lib" / "edgeserve"
    config_dir.mkdir(parents=True)
    config = config_dir / "edgeserve.toml"
    config_text = (
        '[server]\nhost = "127.0.0.1"\nport = {port}\n'
        f'state_dir = "{state_dir}"\n[models]\nrepository = "{MODELS}"\n'
    )

    with run_server(tmp_path, config_text=config_text) as server:
        config.write_text(server.config_path.read_text())
        create = ["token", "create", "--scope", "read", "--ttl", "1h", "--subject", "ops"]
        token = subprocess.run(
            [sys.executable, "-m", "edgeserve", *create, "--config", str(config)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{server.url}/v2/models/digits", headers=headers).status_code == 200
    # Stopped, as the docs say, so SQLite and the key files are at rest.

    backed_up_config = config.read_text()
    backup = tmp_path / "edgeserve-backup.tgz"
    run_on_root(readme_command("tar -C / -czpf"), root, cwd=tmp_path)
    assert backup.is_file()
    shutil.rmtree(root)  # the disk dies
    config_dir.parent.mkdir(parents=True)
    run_on_root(readme_command("tar -C / -xzpf"), root, cwd=tmp_path)

    keys = state_dir / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for key in keys.glob("*.pem"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert config.read_text() == backed_up_config
    with run_server(tmp_path, config_text=config_text) as server:  # the restored state_dir
        reply = httpx.get(f"{server.url}/v2/models/digits", headers=headers)
        assert reply.status_code == 200, reply.text
    assert (state_dir / "telemetry.db").is_file()
