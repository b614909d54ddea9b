"""install.sh --uninstall --purge never removes what it did not install (issue 18): a
dangerous path is judged after normalising it (`/var/lib/`, `$HOME/x/..`), and --purge
needs the install marker. Only temporary folders are used: the "dangerous" path here is
a temporary $HOME, never a real system folder."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.test_install_script import CHECKOUT

pytestmark = pytest.mark.slow


def _run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    shell = "/bin/dash" if Path("/bin/dash").exists() else "/bin/sh"
    return subprocess.run(
        [shell, str(CHECKOUT / "install.sh"), "--uninstall", "--no-systemd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=home.parent,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HOME": str(home)},
    )


def _box(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """A temporary $HOME holding a precious file, and an install marker's prefix."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "precious.txt").write_text("keep me")
    prefix, config_dir, state_dir = tmp_path / "opt", tmp_path / "etc", tmp_path / "state"
    for folder in (prefix, config_dir, state_dir):
        folder.mkdir()
    (prefix / ".edgeserve-install").write_text(
        f"fingerprint=x\nconfig_dir={config_dir}\nstate_dir={state_dir}\nsystemd=no\n"
    )
    return home, prefix, config_dir, state_dir


@pytest.mark.parametrize("spelling", ["{home}/", "{home}//", "{home}/sub/..", "{home}/./"])
@pytest.mark.parametrize("option", ["--state-dir", "--config-dir"])
def test_purge_refuses_a_dangerous_folder_however_it_is_spelled(
    tmp_path: Path, spelling: str, option: str
) -> None:
    home, prefix, _, _ = _box(tmp_path)
    target = spelling.format(home=home)
    result = _run(home, "--purge", "--prefix", str(prefix), option, target)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "refusing to remove" in result.stderr
    assert (home / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("spelling", ["{home}/", "{home}/sub/.."])
def test_uninstall_refuses_a_dangerous_prefix_however_it_is_spelled(
    tmp_path: Path, spelling: str
) -> None:
    home, _, _, _ = _box(tmp_path)
    (home / ".edgeserve-install").write_text("fingerprint=x\nsystemd=no\n")
    result = _run(home, "--prefix", spelling.format(home=home))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "refusing to remove" in result.stderr
    assert (home / "precious.txt").read_text() == "keep me"


def test_purge_needs_the_install_marker(tmp_path: Path) -> None:
    home, _, config_dir, state_dir = _box(tmp_path)
    (state_dir / "data.db").write_text("not ours")
    (config_dir / "edgeserve.toml").write_text("# not ours\n")
    args = ["--config-dir", str(config_dir), "--state-dir", str(state_dir)]
    result = _run(home, "--purge", "--prefix", str(tmp_path / "never-installed"), *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not purging" in result.stderr
    assert (state_dir / "data.db").exists() and (config_dir / "edgeserve.toml").exists()


def test_purge_with_the_marker_removes_config_and_state(tmp_path: Path) -> None:
    home, prefix, config_dir, state_dir = _box(tmp_path)
    (config_dir / "edgeserve.toml").write_text("# ours\n")
    result = _run(home, "--purge", "--prefix", str(prefix))  # the marker names the folders
    assert result.returncode == 0, result.stdout + result.stderr
    assert not prefix.exists() and not state_dir.exists() and not config_dir.exists()
    assert (home / "precious.txt").exists()
