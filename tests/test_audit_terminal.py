"""`edgeserve audit show` prints what clients wrote into the audit log (paths, reasons):
control characters reach the terminal escaped, never as escape sequences (issue 18)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from edgeserve.auth import issuer
from tests.serving import run_server
from tests.test_auth_server import wait_until_live

pytestmark = pytest.mark.slow

# OSC "set window title", then CSI "red", a C1 CSI (U+009B), a bell and a bidi override
HOSTILE = "%1B%5D0%3Bpwned%07%1B%5B31m%C2%9B2J%E2%80%AE"
RAW = ("\x1b", "\x07", "\x9b", "\u202e")


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_audit_show_escapes_control_characters(tmp_path: Path, as_json: bool) -> None:
    state_dir = tmp_path / "state"
    issuer.init_keys(state_dir)
    empty = tmp_path / "models"
    empty.mkdir()
    reader = issuer.create_token(state_dir, ["read"], 600, "it", "edgeserve-local", "edgeserve")
    with run_server(
        tmp_path, "[auth]\nfailed_auth_burst = 0\n", repository=empty, wait_ready=False
    ) as server:
        wait_until_live(server)
        reply = httpx.post(
            f"{server.url}/v2/models/{HOSTILE}/infer",
            headers={"authorization": f"Bearer {reader}"},
        )
        assert reply.status_code == 403  # audited as auth.forbidden, with the path as target
    # the server has stopped: its aggregated rows are on disk
    command = [
        sys.executable,
        "-m",
        "edgeserve",
        "audit",
        "show",
        "--config",
        str(server.config_path),
    ]
    done = subprocess.run(
        command + (["--json"] if as_json else []), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "auth.forbidden" in done.stdout
    for char in RAW:
        assert char not in done.stdout, f"{char!r} reached the terminal"
    assert "\\u001b]0;pwned" in done.stdout  # shown, as text
    if as_json:  # still JSON, and the path reads back exactly
        rows = [json.loads(line) for line in done.stdout.splitlines()]
        targets = [r["target"] for r in rows if r["action"] == "auth.forbidden"]
        assert targets == ["/v2/models/\x1b]0;pwned\x07\x1b[31m\x9b2J\u202e/infer"]
