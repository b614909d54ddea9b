"""Updates across real process deaths and restarts: SIGKILL at each install step, the
boot counter, the CLI with the server stopped or running, at-rest encryption and key
rotation, the master key file check, and admin scope on uploads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from edgeserve.auth.issuer import create_token, init_keys
from edgeserve.config.loader import load_settings
from tests.serving import run_server, write_config
from tests.test_updates_kit import (
    DIGITS,
    UpdateKit,
    digits_rows,
    served_version,
    upload,
    wait_for,
)
from updater import file_key_id, read_master_key_file


def status(url: str) -> dict:
    r = httpx.get(f"{url}/api/models/digits/update", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def edgeserve(
    *args: str, config: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeserve", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("step", "serves"),
    [
        ("during_write", "3"),
        ("after_fsync", "3"),
        ("before_flip", "3"),
        ("after_flip", "4"),
        ("during_probation", "4"),
    ],
)
def test_server_killed_during_an_upload_restarts_whole(
    tmp_path: Path, step: str, serves: str
) -> None:
    kit = UpdateKit(tmp_path)
    config = kit.config(watch_window_s=600.0)
    with run_server(tmp_path, config) as server:
        assert upload(server.url, kit.bundle(3, source=1)).status_code == 201
    with run_server(tmp_path, config, env={"UPDATER_CRASH_AT": step}) as server:
        with pytest.raises(httpx.TransportError):
            upload(server.url, kit.bundle(4, source=2))
        assert server.process.wait(30) == -signal.SIGKILL
    with run_server(tmp_path, config) as server:
        assert served_version(server.url) == serves
        doc = status(server.url)
        assert doc["pending"] is None and doc["active_version"] == int(serves)
        retry = upload(server.url, kit.bundle(5, source=2))
        assert retry.status_code == 201, retry.text
        assert served_version(server.url) == "5"


def test_unconfirmed_boots_roll_back_to_the_previous_slot(tmp_path: Path) -> None:
    kit = UpdateKit(tmp_path)
    config = kit.config(watch_window_s=600.0, max_unconfirmed_boots=1)
    with run_server(tmp_path, config) as server:
        assert upload(server.url, kit.bundle(3, source=1)).status_code == 201
        assert upload(server.url, kit.bundle(4, source=2)).status_code == 201
        server.process.kill()  # a crash while version 4 is on probation
    with run_server(tmp_path, config) as server:  # boot 1 of 1 allowed
        assert served_version(server.url) == "4"
        server.process.kill()
    with run_server(tmp_path, config) as server:  # boot 2: rolled back before loading
        assert served_version(server.url) == "3"
        last = status(server.url)["history"][-1]
        assert last["event"] == "rollback" and "boots without confirmation" in last["reason"]


def test_cli_apply_with_the_server_stopped_and_then_running(tmp_path: Path) -> None:
    kit = UpdateKit(tmp_path)
    config_text = kit.config(watch_window_s=600.0)
    # the CLI's config: `update apply` does not listen, run_server starts its own server
    config = write_config(tmp_path / "edgeserve.toml", config_text, 0, kit.state_dir)
    applied = edgeserve("update", "apply", str(kit.bundle(3, source=1)), config=config)
    assert applied.returncode == 0, applied.stderr
    with run_server(tmp_path, config_text) as server:
        assert served_version(server.url) == "3"
        applied = edgeserve("update", "apply", str(kit.bundle(4, source=2)), config=config)
        assert applied.returncode == 0, applied.stderr
        assert served_version(server.url) == "3"  # until told
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: served_version(server.url) == "4", 30, "the SIGHUP swap")
        refused = edgeserve("update", "apply", str(kit.bundle(2)), config=config)
        assert refused.returncode == 1 and "not_newer" in refused.stderr
        back = edgeserve("update", "rollback", "digits", config=config)
        assert back.returncode == 0, back.stderr
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: served_version(server.url) == "3", 30, "the SIGHUP rollback")
        shown = edgeserve("update", "status", "digits", "--json", config=config)
        assert '"verdict": "rolled_back"' in shown.stdout


def _windows(data: bytes, size: int = 32) -> set[bytes]:
    return {data[i : i + size] for i in range(0, len(data) - size, 7)}


@contextmanager
def _traffic(url: str) -> Iterator[list[tuple[int, str]]]:
    """Inference requests one after another until the block ends: (status, version) each."""
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def send() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(f"{url}/v2/models/digits/infer", json=digits_rows())
                version = r.json().get("model_version", "") if r.status_code == 200 else ""
                answers.append((r.status_code, version))

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        yield answers
    finally:
        stop.set()
        sender.join(60)


def test_models_at_rest_hold_no_plaintext_and_survive_a_key_rotation(tmp_path: Path) -> None:
    kit = UpdateKit(tmp_path)
    config_text = kit.config(watch_window_s=600.0)
    with run_server(tmp_path, config_text) as server:
        assert upload(server.url, kit.bundle(3, source=1)).status_code == 201
        assert upload(server.url, kit.bundle(4, source=2)).status_code == 201
        stored = b"".join(
            p.read_bytes() for p in (kit.state_dir / "models").rglob("*") if p.is_file()
        )
        for source in (1, 2):
            plain = (DIGITS / str(source) / "model.onnx").read_bytes()
            assert not any(w in stored for w in _windows(plain)), f"plaintext of v{source}"
        old_key = kit.master_path.read_bytes()
        with _traffic(server.url) as answers:  # no downtime: requests all through it
            wait_for(lambda: len(answers) >= 5, 60, "traffic before the rotation")
            rotated = edgeserve("keys", "rotate", config=server.config_path)
            during = len(answers)
            wait_for(lambda: len(answers) >= during + 5, 60, "traffic after the rotation")
        assert rotated.returncode == 0, rotated.stderr
        # 429 is the overload answer a loaded test box may give (the batcher refuses while
        # the event loop runs late); an error, a reset or another version would be downtime
        assert (200, "4") in answers and set(answers) <= {(200, "4"), (429, "")}, Counter(answers)
        assert "re-encrypted" in rotated.stdout
        assert kit.master_path.read_bytes() != old_key
        assert kit.master_path.stat().st_mode & 0o777 == 0o600
        assert not kit.master_path.with_name("master.key.next").exists()
        back = httpx.post(f"{server.url}/api/models/digits/rollback", timeout=60)
        assert back.status_code == 200, back.text  # decrypts slot a under the new key
        assert served_version(server.url) == "3"
    with run_server(tmp_path, config_text) as server:
        assert served_version(server.url) == "3"


def test_an_interrupted_rotation_leaves_every_model_readable(tmp_path: Path) -> None:
    kit = UpdateKit(tmp_path)
    config_text = kit.config(watch_window_s=600.0)
    config = write_config(tmp_path / "edgeserve.toml", config_text, 0, kit.state_dir)
    for version, source in ((3, 1), (4, 2)):
        applied = edgeserve("update", "apply", str(kit.bundle(version, source)), config=config)
        assert applied.returncode == 0, applied.stderr
    crashed = edgeserve(
        "keys", "rotate", config=config, env={"UPDATER_CRASH_AT": "rotate_after_rename"}
    )
    assert crashed.returncode == -signal.SIGKILL
    pending = kit.master_path.with_name("master.key.next")
    assert pending.exists()
    key_ids = {file_key_id(p) for p in kit.state_dir.rglob("*.enc")}
    assert len(key_ids) == 2  # one file under the new key, the rest under the old
    with run_server(tmp_path, config_text) as server:
        assert served_version(server.url) == "4"
        back = httpx.post(f"{server.url}/api/models/digits/rollback", timeout=60)
        assert back.status_code == 200, back.text
        assert served_version(server.url) == "3"
        finished = edgeserve("keys", "rotate", config=config)
        assert finished.returncode == 0, finished.stderr
    assert not pending.exists()
    assert {file_key_id(p) for p in kit.state_dir.rglob("*.enc")} == {
        read_master_key_file(kit.master_path).key_id
    }


def test_a_master_key_file_others_can_read_stops_the_server(tmp_path: Path) -> None:
    kit = UpdateKit(tmp_path)
    kit.master_path.chmod(0o640)
    config = write_config(tmp_path / "edgeserve.toml", kit.config(), 0, kit.state_dir)
    result = edgeserve("serve", config=config)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("edgeserve:")]
    assert len(lines) == 1 and "chmod 600" in lines[0], result.stderr


def test_uploads_and_rollbacks_need_the_admin_scope(tmp_path: Path) -> None:
    kit = UpdateKit(tmp_path)
    init_keys(kit.state_dir)
    with run_server(tmp_path, kit.config(auth=True, watch_window_s=600.0)) as server:
        auth = load_settings(server.config_path).auth

        def token(*scopes: str) -> str:
            return create_token(kit.state_dir, scopes, 600, "tester", auth.issuer, auth.audience)

        bundle = kit.bundle(3, source=1)
        assert upload(server.url, bundle).status_code == 401
        assert upload(server.url, bundle, token("infer", "read")).status_code == 403
        r = httpx.post(
            f"{server.url}/api/models/digits/rollback",
            headers={"authorization": f"Bearer {token('read')}"},
        )
        assert r.status_code == 403
        assert upload(server.url, bundle, token("admin")).status_code == 201
        r = httpx.get(
            f"{server.url}/api/models/digits/update",
            headers={"authorization": f"Bearer {token('read')}"},
        )
        assert r.status_code == 200 and r.json()["active_version"] == 3
    assert os.path.exists(kit.state_dir / "models" / "digits" / "state.json")
