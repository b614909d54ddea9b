"""Every secret key file is refused when group or others can read it, as the master key
is (issue 18): the token signing key and audit.key at 0644 stop `serve` and the
commands that use them, naming the file, its mode and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeserve.audit import chain
from edgeserve.auth import issuer
from edgeserve.auth.secret_files import read_or_create_secret

pytestmark = pytest.mark.slow


def _config(tmp_path: Path) -> Path:
    state_dir = tmp_path / "state"
    issuer.init_keys(state_dir)
    read_or_create_secret(chain.key_path(state_dir))
    chain.connect(chain.db_path(state_dir)).close()
    empty = tmp_path / "models"
    empty.mkdir()
    config = tmp_path / "edgeserve.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 0\nstate_dir = "{state_dir}"\n'
        f'[models]\nrepository = "{empty}"\n'
    )
    return config


def _edgeserve(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgeserve", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,  # a server that starts anyway fails the test here
    )


KEY_FILES = {
    "token signing key": lambda state: state / "keys" / issuer.SIGNING_KEY_NAME,
    "audit key": chain.key_path,
}
COMMANDS = {
    "token signing key": [["serve"], ["token", "create", "--scope", "infer", "--subject", "x"]],
    "audit key": [["serve"], ["audit", "verify"]],
}


@pytest.mark.parametrize(
    ("which", "command"),
    [(which, command) for which, commands in COMMANDS.items() for command in commands],
    ids=lambda v: v if isinstance(v, str) else v[0] + (f" {v[1]}" if len(v) > 1 else ""),
)
@pytest.mark.parametrize("mode", [0o644, 0o640], ids=["0644", "0640"])
def test_a_key_file_others_can_read_is_refused(
    tmp_path: Path, which: str, command: list[str], mode: int
) -> None:
    config = _config(tmp_path)
    path = KEY_FILES[which](tmp_path / "state")
    path.chmod(mode)
    done = _edgeserve(config, *command)
    assert done.returncode in (1, 2), done.stdout + done.stderr
    assert f"mode {mode:04o}" in done.stderr and str(path) in done.stderr
    assert f"chmod 600 {path}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("which", list(KEY_FILES))
def test_a_private_key_file_is_accepted(tmp_path: Path, which: str) -> None:
    config = _config(tmp_path)
    assert KEY_FILES[which](tmp_path / "state").stat().st_mode & 0o077 == 0
    command = COMMANDS[which][1]
    assert _edgeserve(config, *command).returncode == 0
