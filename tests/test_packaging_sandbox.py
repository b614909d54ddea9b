"""The server works inside the restrictions the systemd unit sets, reproduced by hand in
private namespaces (systemd is not PID 1 here): a read-only file system except the state
dir (ProtectSystem=strict), /proc with only processes and no others' (ProcSubset=pid,
ProtectProc=invisible), a private /tmp, an unprivileged user with no capabilities and
no_new_privs (User=, CapabilityBoundingSet=, NoNewPrivileges=). With the kernel's
memory-deny-write-execute (what MemoryDenyWriteExecute= enforces) ONNX Runtime still
serves and OpenVINO cannot compile: the reason the unit leaves that option off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.serving import MODELS, ROOT

NOBODY = 65534

DRIVER = r"""
set -eu
mount -t proc -o subset=pid,hidepid=invisible proc /proc
# PrivateTmp=yes and ProtectHome=yes: empty /tmp, /home and /root. What the test itself
# needs from there is put back: the checkout (CI may clone it under /tmp) and this
# machine's Python (pyenv, under /root; a box uses /usr/bin/python3).
i=0
for keep in $KEEP; do
    i=$((i + 1))
    mkdir -p "$STATE/.keep/$i"
    mount --bind "$keep" "$STATE/.keep/$i"
done
mount -t tmpfs private-tmp /tmp
mount -t tmpfs -o mode=0755 protect-home /home
mount -t tmpfs -o mode=0755 protect-home /root
i=0
for keep in $KEEP; do
    i=$((i + 1))
    mkdir -p "$keep"
    mount --bind "$STATE/.keep/$i" "$keep"
done
mount --bind "$STATE" "$STATE"          # stays writable when / turns read-only
mount -o remount,bind,ro /
cd "$STATE"
HOME=$STATE setpriv --reuid=65534 --regid=65534 --clear-groups --nnp \
    --bounding-set=-all --inh-caps=-all \
    "$PY" -c '
import ctypes, os, sys
if os.environ.get("MDWE") == "1":
    assert ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) == 0  # PR_SET_MDWE
os.execv(sys.executable, [sys.executable, "-m", "edgeserve", "serve", "--config", sys.argv[1]])
' "$CONFIG" >"$STATE/server.log" 2>&1 &
server=$!
"$PY" - "$STATE/server.log" "$GIVE_UP_ON" <<'PY' >"$STATE/client.out" 2>&1 || true
import json, re, sys, time, urllib.request
log, give_up_on = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 90
ready = False
base = ""
while not ready and time.monotonic() < deadline:
    if not base:  # port = 0: the kernel picks the port; the `listening` line names it
        found = re.search(r"listening url=http://[^ ]*?:([0-9]+)", open(log).read())
        base = f"http://127.0.0.1:{found.group(1)}" if found else ""
    try:
        if base:
            ready = urllib.request.urlopen(base + "/v2/health/ready", timeout=2).status == 200
    except OSError:
        pass
    if not ready:
        time.sleep(0.2)
    if give_up_on and open(log).read().count(give_up_on) >= 2:  # both versions failed
        break
if not ready:
    print("ready=no")
    sys.exit(0)
print("ready=yes")
body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
request = urllib.request.Request(
    base + "/v2/models/digits/infer", json.dumps(body).encode(),
    {"content-type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as answer:
    print(f"infer={answer.status}")
with urllib.request.urlopen(base + "/v2/models/digits", timeout=30) as answer:
    print("metadata=" + json.dumps(json.load(answer)))
PY
kill -TERM "$server"
wait "$server" && echo "exit=0" >>"$STATE/client.out" || echo "exit=$?" >>"$STATE/client.out"
"""


def can_sandbox() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"):
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "true"],
        capture_output=True,
    )
    return probe.returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_sandbox(), reason="needs root, unshare(1) and setpriv(1)"),
]


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Outside /tmp, which the sandbox replaces with an empty private one."""
    folder = Path(tempfile.mkdtemp(prefix="edgeserve-sandbox-", dir="/var/tmp"))
    os.chown(folder, NOBODY, NOBODY)
    folder.chmod(0o700)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def hidden_paths_needed() -> str:
    """Folders under /tmp, /home or /root that the sandboxed server must still see."""
    needed = []
    for path in (Path(os.path.realpath(sys.executable)), ROOT):
        for hidden in (Path("/tmp"), Path("/home"), Path("/root")):
            if path.is_relative_to(hidden):
                needed.append(str(hidden / path.relative_to(hidden).parts[0]))
    return " ".join(dict.fromkeys(needed))


def run_sandboxed(state: Path, backend: str, mdwe: bool, give_up_on: str = "") -> dict[str, str]:
    config = state / "edgeserve.toml"
    config.write_text(
        f'[server]\nport = 0\nstate_dir = "{state}"\n'
        f'[models]\nrepository = "{MODELS}"\nbackend = "{backend}"\nload = ["digits"]\n'
        "[auth]\nenabled = false\n"
    )
    config.chmod(0o644)
    env = {
        **os.environ,
        "STATE": str(state),
        "CONFIG": str(config),
        "PY": sys.executable,
        "MDWE": "1" if mdwe else "0",
        "GIVE_UP_ON": give_up_on,
        "KEEP": hidden_paths_needed(),
    }
    result = subprocess.run(
        ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-c", DRIVER],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    log = (
        (state / "server.log").read_text(errors="replace")
        if (state / "server.log").exists()
        else ""
    )
    assert result.returncode == 0, result.stderr + log
    out = (state / "client.out").read_text()
    facts = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    facts["log"] = log
    return facts


def test_serves_under_the_units_file_process_and_privilege_restrictions(state_dir: Path) -> None:
    facts = run_sandboxed(state_dir, "auto", mdwe=False)
    assert facts.get("ready") == "yes", facts["log"][-3000:]
    assert facts.get("infer") == "200"
    assert facts.get("exit") == "0", facts["log"][-3000:]
    # It wrote its state (keys, telemetry) where the unit lets it, as the unprivileged user.
    assert (state_dir / "telemetry.db").stat().st_uid == NOBODY


def test_onnxruntime_serves_with_memory_deny_write_execute(state_dir: Path) -> None:
    facts = run_sandboxed(state_dir, "onnxruntime", mdwe=True)
    assert facts.get("ready") == "yes", facts["log"][-3000:]
    assert facts.get("infer") == "200"


def test_openvino_cannot_compile_with_memory_deny_write_execute(state_dir: Path) -> None:
    failed = "model load failed model=digits"
    facts = run_sandboxed(state_dir, "openvino", mdwe=True, give_up_on=failed)
    assert facts.get("ready") == "no"
    # OpenVINO's message is "can't protect" (mprotect to executable refused); the server
    # logs only the first line of it.
    assert facts["log"].count(failed) == 2, facts["log"][-3000:]
    assert "openvino could not load the model" in facts["log"]


def test_auto_backend_falls_back_to_onnxruntime_with_memory_deny_write_execute(
    state_dir: Path,
) -> None:
    facts = run_sandboxed(state_dir, "auto", mdwe=True)
    assert facts.get("ready") == "yes", facts["log"][-3000:]
    assert facts.get("infer") == "200"
    assert "backend fallback model=digits from=openvino to=onnxruntime" in facts["log"]
