"""install.sh's service install with its real defaults (/opt/edgeserve, /etc/edgeserve,
/var/lib/edgeserve, the edgeserve user, the unit), run as root inside a private mount
namespace: /etc, /opt and /var/lib are overlays on a tmpfs, so the host is untouched.

systemd is not PID 1 here, so `systemctl` is a stand-in that records its calls and runs
the unit's ExecStart as the unit's User (with the master key passed like LoadCredential);
everything else (systemd-sysusers, pip, the readiness wait) is real.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving import free_port
from tests.test_install_script import NOT_IN_A_CLONE

CHECKOUT = Path(__file__).resolve().parent.parent
# The service runs the venv's interpreter as its own user, so it must be a system one.
SYSTEM_PYTHON = "/usr/bin/python3"
REAL_PYTHON = os.path.realpath(sys.executable)

FAKE_SYSTEMCTL = r"""#!/bin/sh
# Stand-in for systemctl: records calls; start runs ExecStart as User, like systemd would.
echo "$*" >>"$T/systemctl.log"
unit=/etc/systemd/system/edgeserve.service
pidfile=$T/edgeserve.pid
running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
start() {
    user=$(sed -n 's/^User=//p' "$unit")
    creds=/run/systemd/test-credentials
    mkdir -p "$creds"
    cp /etc/edgeserve/master.key "$creds/edgeserve-master-key"
    chown -R "$user" "$creds"
    chmod 0500 "$creds"
    chmod 0400 "$creds/edgeserve-master-key"
    cd "$(sed -n 's/^WorkingDirectory=//p' "$unit")"
    # Through sh, so the program itself is exec'd by the user with no capability left.
    # shellcheck disable=SC2046
    CREDENTIALS_DIRECTORY=$creds setpriv --reuid="$user" --regid="$user" --init-groups \
        --inh-caps=-all --bounding-set=-all --nnp \
        sh -c 'exec "$0" "$@"' $(sed -n 's/^ExecStart=//p' "$unit") >>"$T/server.log" 2>&1 &
    echo $! >"$pidfile"
}
stop() {
    running || return 0
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
    rm -f "$pidfile"
}
case "$1" in
    daemon-reload) ;;
    is-enabled) [ -f "$T/enabled" ] ;;
    enable) touch "$T/enabled" ;;
    disable) rm -f "$T/enabled"; case "$*" in *--now*) stop ;; esac ;;
    is-active) running ;;
    start) running || start ;;
    restart) stop; start ;;
    *) echo "fake systemctl: unexpected $*" >&2; exit 1 ;;
esac
"""

DRIVER = r"""
set -eu
# Private, throw-away copies of everything the installer writes to.
mount -t tmpfs edgeserve-test "$T/ov"
for dir in etc opt var/lib; do
    name=$(echo "$dir" | tr / _)
    mkdir -p "$T/ov/$name.upper" "$T/ov/$name.work"
    mount -t overlay overlay \
        -o "lowerdir=/$dir,upperdir=$T/ov/$name.upper,workdir=$T/ov/$name.work" "/$dir"
done
mount -t tmpfs edgeserve-test-run /run/systemd
mkdir -p /run/systemd/system /etc/systemd/system
trap '[ -f "$T/edgeserve.pid" ] && kill -9 "$(cat "$T/edgeserve.pid")" 2>/dev/null || true' EXIT
export PATH="$T/bin:$PATH"

facts() {  # facts LABEL: what the checks in Python read
    {
        echo "== $1"
        id edgeserve 2>&1 || true
        for p in /opt/edgeserve/bin/edgeserve /etc/edgeserve /etc/edgeserve/edgeserve.toml \
            /etc/edgeserve/master.key /var/lib/edgeserve /var/lib/edgeserve/keys \
            /var/lib/edgeserve/keys/token_signing_key.pem /etc/systemd/system/edgeserve.service \
            /etc/sysusers.d/edgeserve.conf /etc/tmpfiles.d/edgeserve.conf \
            /etc/systemd/system/edgeserve.service.d/10-install-memory.conf; do
            if [ -e "$p" ]; then echo "stat $p $(stat -c '%U:%G %a' "$p")"
            else echo "absent $p"; fi
        done
        if [ -f "$T/edgeserve.pid" ] && kill -0 "$(cat "$T/edgeserve.pid")" 2>/dev/null; then
            echo "server-user $(ps -o user= -p "$(cat "$T/edgeserve.pid")")"
        else
            echo "server-user none"
        fi
    } >>"$T/facts"
}

step() {  # step NAME INSTALL-ARGS...: run install.sh, keep its output in $T/NAME.out
    name=$1
    shift
    sh ./install.sh --python "$SYSTEM_PYTHON" "$@" >"$T/$name.out" 2>&1 \
        || { echo "$name failed" >>"$T/facts"; exit 1; }
}

cd "$CHECKOUT"
# An interpreter under /root (pyenv) is refused: ProtectHome=yes would hide it.
if [ -n "$HOME_PYTHON" ]; then
    if sh ./install.sh --python "$HOME_PYTHON" >"$T/run0.out" 2>&1; then
        echo "run0 accepted $HOME_PYTHON" >>"$T/facts"
    fi
fi
step run1 --no-start --memory-max 3G
facts after-run1
systemd-analyze verify /etc/systemd/system/edgeserve.service >"$T/verify.out" 2>&1 \
    && echo "verify ok" >>"$T/facts" || echo "verify failed" >>"$T/facts"
# The operator sets the port (and the installer must keep the file from now on).
sed -i "s/^port = 8080$/port = $PORT/" /etc/edgeserve/edgeserve.toml
step run2 --memory-max 3G
facts after-run2
: >"$T/systemctl.log"
step run3 --memory-max 3G
cp "$T/systemctl.log" "$T/systemctl-run3.log"
grep -c "^port = $PORT$" /etc/edgeserve/edgeserve.toml >>"$T/facts"
step uninstall --uninstall
facts after-uninstall
step purge --uninstall --purge
facts after-purge
"""


def can_unshare_mounts() -> bool:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return False
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"], capture_output=True
    )
    return probe.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        not can_unshare_mounts(),
        reason=f"needs root, unshare(1), setpriv(1) and {SYSTEM_PYTHON} for a sandbox",
    ),
]


@pytest.fixture(scope="module")
def sandbox_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("systemd-install")
    (work / "ov").mkdir()
    (work / "bin").mkdir()
    systemctl = work / "bin" / "systemctl"
    systemctl.write_text(FAKE_SYSTEMCTL)
    systemctl.chmod(0o755)
    # A snapshot, as in test_install_script: edits meanwhile must not look like a new release.
    checkout = work / "edgeserve"
    shutil.copytree(CHECKOUT, checkout, ignore=NOT_IN_A_CLONE, symlinks=True)
    env = {
        **os.environ,
        "T": str(work),
        "CHECKOUT": str(checkout),
        "PORT": str(free_port()),  # the driver writes it into /etc's config, then checks it
        "SYSTEM_PYTHON": SYSTEM_PYTHON,
        "HOME_PYTHON": REAL_PYTHON if REAL_PYTHON.startswith(("/root/", "/home/")) else "",
    }
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", DRIVER],
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        stdin=subprocess.DEVNULL,
    )
    logs = "".join(
        f"\n--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted(work.glob("*.out")) + sorted(work.glob("*.log"))
    )
    assert result.returncode == 0, result.stderr + logs
    return work


def section(work: Path, label: str) -> list[str]:
    text = (work / "facts").read_text()
    return text.split(f"== {label}\n", 1)[1].split("\n== ", 1)[0].splitlines()


def stat_of(lines: list[str], path: str) -> str:
    for line in lines:
        if line.startswith(f"stat {path} "):
            return line.split(" ", 2)[2]
        if line == f"absent {path}":
            return "absent"
    raise AssertionError(f"{path} not reported")


def test_first_run_creates_user_dirs_keys_and_unit_with_private_modes(sandbox_run: Path) -> None:
    facts = section(sandbox_run, "after-run1")
    assert any(line.startswith("uid=") and "(edgeserve)" in line for line in facts)
    assert stat_of(facts, "/etc/edgeserve/edgeserve.toml") == "root:edgeserve 640"
    assert stat_of(facts, "/etc/edgeserve/master.key") == "root:root 600"
    assert stat_of(facts, "/var/lib/edgeserve") == "edgeserve:edgeserve 700"
    assert stat_of(facts, "/var/lib/edgeserve/keys") == "edgeserve:edgeserve 700"
    assert stat_of(facts, "/var/lib/edgeserve/keys/token_signing_key.pem") == (
        "edgeserve:edgeserve 600"
    )
    assert stat_of(facts, "/etc/systemd/system/edgeserve.service").startswith("root:root")
    assert "server-user none" in facts  # --no-start
    memory = "/etc/systemd/system/edgeserve.service.d/10-install-memory.conf"
    assert stat_of(facts, memory).startswith("root:root")


def test_installed_unit_passes_systemd_analyze_verify(sandbox_run: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    assert "verify ok" in (sandbox_run / "facts").read_text(), (
        sandbox_run / "verify.out"
    ).read_text()


def test_second_run_starts_the_service_as_edgeserve_and_waits_for_ready(
    sandbox_run: Path,
) -> None:
    facts = section(sandbox_run, "after-run2")
    assert "server-user edgeserve" in facts
    out = (sandbox_run / "run2.out").read_text()
    assert "keeping existing /etc/edgeserve/edgeserve.toml" in out
    assert "edgeserve is ready" in out


def test_third_run_changes_nothing(sandbox_run: Path) -> None:
    out = (sandbox_run / "run3.out").read_text()
    assert "up to date" in out and "installing" not in out
    calls = (sandbox_run / "systemctl-run3.log").read_text().splitlines()
    assert not [c for c in calls if c.split()[0] in {"daemon-reload", "restart", "enable"}], calls
    # The operator's port survived every run.
    assert "\n1\n" in (sandbox_run / "facts").read_text()


def test_uninstall_stops_and_removes_the_service_but_keeps_config_and_state(
    sandbox_run: Path,
) -> None:
    facts = section(sandbox_run, "after-uninstall")
    assert "server-user none" in facts
    assert stat_of(facts, "/etc/systemd/system/edgeserve.service") == "absent"
    assert stat_of(facts, "/opt/edgeserve/bin/edgeserve") == "absent"
    memory = "/etc/systemd/system/edgeserve.service.d/10-install-memory.conf"
    assert stat_of(facts, memory) == "absent"
    assert stat_of(facts, "/etc/edgeserve/edgeserve.toml") == "root:edgeserve 640"
    assert stat_of(facts, "/var/lib/edgeserve/keys") == "edgeserve:edgeserve 700"


def test_purge_removes_config_state_and_user(sandbox_run: Path) -> None:
    facts = section(sandbox_run, "after-purge")
    assert any("no such user" in line for line in facts)
    for path in ("/etc/edgeserve", "/var/lib/edgeserve", "/etc/sysusers.d/edgeserve.conf"):
        assert stat_of(facts, path) == "absent", path


def test_an_interpreter_the_service_cannot_reach_is_refused(sandbox_run: Path) -> None:
    if not REAL_PYTHON.startswith(("/root/", "/home/")):
        pytest.skip("this machine's Python is not under /root or /home")
    assert "run0 accepted" not in (sandbox_run / "facts").read_text()
    assert "use a system Python" in (sandbox_run / "run0.out").read_text()
