"""install.sh on this checkout: a real venv under a temporary prefix, the installed server
answering /v2/health/ready, a second run that changes nothing, and uninstall.

Without systemd here (no PID 1 systemd in CI), the box install runs with --no-systemd;
the unit itself is checked in test_packaging_systemd.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.waiting import wait_until

CHECKOUT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Install:
    prefix: Path
    config_dir: Path
    state_dir: Path
    first_output: str

    @property
    def args(self) -> list[str]:
        return [
            "--prefix",
            str(self.prefix),
            "--config-dir",
            str(self.config_dir),
            "--state-dir",
            str(self.state_dir),
            "--no-systemd",
        ]

    @property
    def config(self) -> Path:
        return self.config_dir / "edgeserve.toml"


# What a fresh clone has; the rest of a working tree (venvs, caches, state) is left out.
NOT_IN_A_CLONE = shutil.ignore_patterns(
    ".git",
    ".venv",
    ".edgeserve",
    "__pycache__",
    "*.pyc",
    "*.egg-info",
    "build",
    "dist",
    ".pytest_cache",
    ".ruff_cache",
    "test-artifacts",
    "minilm",
    "bench",
    "tests",
)


def run_install(
    *args: str, timeout_s: float = 600, checkout: Path = CHECKOUT
) -> subprocess.CompletedProcess[str]:
    # /bin/sh may be bash elsewhere; dash (Debian's sh) proves the script is POSIX.
    shell = "/bin/dash" if Path("/bin/dash").exists() else "/bin/sh"
    return subprocess.run(
        [shell, str(checkout / "install.sh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=checkout,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the checkout, so edits made meanwhile in the working tree do not
    count as a new release between the first and the second run."""
    copy = tmp_path_factory.mktemp("clone") / "edgeserve"
    shutil.copytree(CHECKOUT, copy, ignore=NOT_IN_A_CLONE, symlinks=True)
    return copy


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, checkout_copy: Path) -> Install:
    root = tmp_path_factory.mktemp("box")
    install = Install(root / "opt", root / "etc", root / "state", "")
    result = run_install(*install.args, checkout=checkout_copy)
    assert result.returncode == 0, result.stdout + result.stderr
    return Install(install.prefix, install.config_dir, install.state_dir, result.stdout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def installed_server(installed: Install, tmp_path: Path) -> Iterator[str]:
    """The installed program, started from the prefix with the installed config."""
    port = free_port()
    # Its log goes to a file: a pipe nobody reads was left open (a ResourceWarning) and
    # would stall the server once full.
    with (tmp_path / "installed-server.log").open("w") as log:
        process = subprocess.Popen(
            [str(installed.prefix / "bin" / "edgeserve"), "serve", "--port", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=installed.state_dir,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            yield url
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


pytestmark = pytest.mark.slow


def test_install_creates_a_venv_with_the_edgeserve_command(installed: Install) -> None:
    edgeserve = installed.prefix / "venv" / "bin" / "edgeserve"
    assert os.access(edgeserve, os.X_OK)
    version = subprocess.run(
        [str(installed.prefix / "bin" / "edgeserve"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0 and "version" in version.stdout
    # A real install, not a link back to the checkout.
    assert not list((installed.prefix / "venv").rglob("__editable__*edgeserve*"))
    assert (installed.prefix / "models" / "digits" / "model.toml").is_file()


def test_config_points_at_this_install_and_is_private(installed: Install) -> None:
    text = installed.config.read_text()
    assert f'state_dir = "{installed.state_dir}"' in text
    assert f'repository = "{installed.prefix / "models"}"' in text
    assert stat.S_IMODE(installed.config.stat().st_mode) == 0o640


def test_state_dir_and_keys_are_owner_only(installed: Install) -> None:
    assert stat.S_IMODE(installed.state_dir.stat().st_mode) == 0o700
    keys = installed.state_dir / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for name in ("token_signing_key.pem", "master.key"):
        assert stat.S_IMODE((keys / name).stat().st_mode) == 0o600, name


def test_installed_server_answers_ready(installed_server: str) -> None:

    def ready() -> bool:
        try:
            return httpx.get(f"{installed_server}/v2/health/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, 60, "the installed server to be ready", interval_s=0.2)


def test_second_run_is_a_no_op_and_keeps_an_edited_config(
    installed: Install, checkout_copy: Path
) -> None:
    edited = installed.config.read_text() + "\n# edited by the operator\n"
    installed.config.write_text(edited)
    keys_before = {p.name: p.read_bytes() for p in (installed.state_dir / "keys").iterdir()}
    marker = installed.prefix / ".edgeserve-install"
    marker_before = marker.read_text()
    venv_mtime = (installed.prefix / "venv").stat().st_mtime_ns

    result = run_install(*installed.args, timeout_s=120, checkout=checkout_copy)

    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout and "installing" not in result.stdout
    assert installed.config.read_text() == edited
    assert {p.name: p.read_bytes() for p in (installed.state_dir / "keys").iterdir()} == (
        keys_before
    )
    assert marker.read_text() == marker_before
    assert (installed.prefix / "venv").stat().st_mtime_ns == venv_mtime


def test_uninstall_removes_the_program_and_keeps_config_and_state(installed: Install) -> None:
    result = run_install("--uninstall", "--prefix", str(installed.prefix), timeout_s=60)
    assert result.returncode == 0, result.stderr
    assert not installed.prefix.exists()
    assert installed.config.is_file()
    assert (installed.state_dir / "keys" / "master.key").is_file()
    assert "kept config" in result.stdout


def test_uninstall_purge_removes_config_and_state(installed: Install) -> None:
    result = run_install("--uninstall", "--purge", *installed.args, timeout_s=60)
    assert result.returncode == 0, result.stderr
    assert not installed.config.exists()
    assert not installed.state_dir.exists()


# --- checks that need no install ---------------------------------------------------------


def test_help_exits_zero_and_names_every_option() -> None:
    result = run_install("--help", timeout_s=30)
    assert result.returncode == 0
    for option in ("--serve", "--dev", "--prefix", "--wheel", "--config-dir", "--state-dir"):
        assert option in result.stdout
    for option in ("--no-systemd", "--no-start", "--uninstall", "--purge"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option: --bogus"),
        (["--prefix"], "--prefix needs a value"),
        (["--purge"], "--purge goes with --uninstall"),
        (["--prefix", "/tmp/a b"], "use a path of letters"),
        (["--state-dir", '/tmp/x"y'], "use a path of letters"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = run_install(*args, timeout_s=30)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("fake_python", "message"),
    [
        # reports 3.8: the version check fails
        ('case "$*" in -V) echo "Python 3.8.10";; *) exit 1;; esac', "3.10 or newer is needed"),
        # right version but no venv/ensurepip (Debian without python3-venv)
        (
            'case "$*" in *venv*) exit 1;; -V) echo "Python 3.11.2";; *) exit 0;; esac',
            "apt-get install python3-venv",
        ),
    ],
)
def test_missing_python_pieces_are_named(tmp_path: Path, fake_python: str, message: str) -> None:
    python = tmp_path / "python3"
    python.write_text(f"#!/bin/sh\n{fake_python}\n")
    python.chmod(0o755)
    result = run_install(
        "--python", str(python), "--no-systemd", "--prefix", str(tmp_path / "p"), timeout_s=30
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert not (tmp_path / "p").exists()


def test_uninstall_refuses_a_prefix_it_did_not_create(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_install("--uninstall", "--no-systemd", "--prefix", str(tmp_path), timeout_s=30)
    assert result.returncode == 1
    assert "not installed by install.sh" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_install_sh_is_posix_and_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", "--shell=sh", str(CHECKOUT / "install.sh")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout


def test_install_from_a_wheel(tmp_path: Path, checkout_copy: Path) -> None:
    dist = tmp_path / "dist"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            str(dist),
            str(checkout_copy),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = dist.glob("edgeserve-*.whl")
    args = [
        "--wheel",
        str(wheel),
        "--prefix",
        str(tmp_path / "opt"),
        "--config-dir",
        str(tmp_path / "etc"),
        "--state-dir",
        str(tmp_path / "state"),
        "--no-systemd",
    ]
    first = run_install(*args, checkout=checkout_copy)
    assert first.returncode == 0, first.stdout + first.stderr
    version = subprocess.run(
        [str(tmp_path / "opt" / "bin" / "edgeserve"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0, version.stderr
    again = run_install(*args, timeout_s=120, checkout=checkout_copy)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_a_missing_wheel_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.whl"
    result = run_install("--wheel", str(missing), "--no-systemd", "--prefix", str(tmp_path / "p"))
    assert result.returncode == 1
    assert f"no such wheel: {missing}" in result.stderr
