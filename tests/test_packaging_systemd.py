"""The systemd unit, sysusers.d and tmpfiles.d files pass systemd's own checks.

.ci/run installs Debian's systemd package when `systemd-analyze` is missing; without
it these tests skip with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGING = Path(__file__).resolve().parent.parent / "packaging"
UNIT = PACKAGING / "systemd" / "edgeserve.service"
README = PACKAGING / "README.md"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package: systemd)",
)


def render_unit(tmp_path: Path) -> Path:
    """The unit as install.sh writes it for a prefix whose venv really has `edgeserve`."""
    prefix = tmp_path / "prefix"
    (prefix / "venv" / "bin").mkdir(parents=True)
    (prefix / "venv" / "bin" / "edgeserve").symlink_to(Path(sys.executable).parent / "edgeserve")
    unit = tmp_path / "edgeserve.service"
    unit.write_text(UNIT.read_text().replace("/opt/edgeserve", str(prefix)))
    return unit


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_declares_readiness_watchdog_reload_and_graceful_stop() -> None:
    unit = directives(UNIT.read_text())
    assert unit["Type"] == ["notify"]
    assert unit["WatchdogSec"] and unit["Restart"] == ["on-failure"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillSignal"] == ["SIGTERM"]
    # graceful_timeout_s defaults to 10 s: the stop timeout must leave room to drain.
    assert int(unit["TimeoutStopSec"][0].rstrip("s")) > 10


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("User", "edgeserve"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("StateDirectory", "edgeserve"),
        ("ConfigurationDirectory", "edgeserve"),
        ("LoadCredential", "edgeserve-master-key:/etc/edgeserve/master.key"),
        ("CapabilityBoundingSet", ""),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallFilter", "@system-service"),
        ("UMask", "0077"),
        ("LockPersonality", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelLogs", "yes"),
    ],
)
def test_unit_hardening_option(key: str, value: str) -> None:
    assert value in directives(UNIT.read_text()).get(key, []), f"{key}={value} missing"


def test_memory_limit_is_set_and_disabled_options_say_why() -> None:
    text = UNIT.read_text()
    assert directives(text)["MemoryMax"]
    # Each relaxed option carries the reason right above it.
    block = text.split("MemoryDenyWriteExecute=no")[0].rsplit("\n\n", 1)[-1]
    assert "OpenVINO" in block and "JIT" in block


def test_credential_name_matches_the_updater_default() -> None:
    from edgeserve.updates.settings import UpdaterSettings

    credential = directives(UNIT.read_text())["LoadCredential"][0].split(":", 1)[0]
    assert credential == UpdaterSettings().master_key_credential


@needs_analyze
def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    unit = render_unit(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "edgeserve.service" not in result.stderr, result.stderr  # no warnings about us


@needs_analyze
def test_security_exposure_matches_the_figure_in_the_readme(tmp_path: Path) -> None:
    unit = render_unit(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot score offline: {result.stderr.strip()[:200]}")
    score = float(match.group(1))
    assert score <= 2.0, result.stdout
    documented = re.search(r"exposure level[^\d]*(\d+\.\d+)", README.read_text())
    assert documented is not None, "packaging/README.md must state the measured score"
    assert float(documented.group(1)) == score


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers missing")
def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("passwd", "group"):
        (etc / name).write_text("root:x:0:0:root:/root:/bin/sh\n" if name == "passwd" else "")
    (etc / "group").write_text("root:x:0:\n")
    conf = PACKAGING / "sysusers.d" / "edgeserve.conf"
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(conf)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    user = next(
        line.split(":")
        for line in (etc / "passwd").read_text().splitlines()
        if line.startswith("edgeserve:")
    )
    assert user[5] == "/var/lib/edgeserve" and user[6] == "/usr/sbin/nologin"
    assert int(user[2]) < 1000  # a system user


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles missing")
def test_tmpfiles_creates_private_state_dirs(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0::/root:/bin/sh\nedgeserve:x:995:995::/:/bin/false\n")
    (etc / "group").write_text("root:x:0:\nedgeserve:x:995:\n")
    conf = PACKAGING / "tmpfiles.d" / "edgeserve.conf"
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(conf)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for folder in ("var/lib/edgeserve", "var/lib/edgeserve/keys"):
        info = (tmp_path / folder).stat()
        assert oct(info.st_mode & 0o777) == "0o700"
        assert info.st_uid == (995 if os.geteuid() == 0 else info.st_uid)
