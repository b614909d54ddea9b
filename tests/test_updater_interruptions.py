"""Issue 22: every interruption leaves a box that works without a hand on it.

Each test reproduces one defect of the outside fault matrix the way it was found: the
real `edgeserve` CLI or server in a subprocess, killed (or failed) by strace at an exact
system call, or killed with SIGKILL mid-upload; then the box is used again from outside.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.serving import RunningServer, run_server
from tests.syscall_kills import STRACE, KillPoint, kill_points, run_killed, strace_path
from tests.test_updates_kit import served_version, upload
from tests.update_boxes import (
    MODEL,
    Author,
    Box,
    master_key_ids,
    payload_key_ids,
    serving_path_version,
    strays,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.skipif(
    strace_path() is None, reason="needs strace (apt-get install strace)"
)


@pytest.fixture(scope="module")
def author(tmp_path_factory: pytest.TempPathFactory) -> Author:
    return Author.make(tmp_path_factory.mktemp("author"))


@pytest.fixture
def box(tmp_path: Path, author: Author) -> Box:
    return Box.fresh(tmp_path / "box", author)


def point_of(
    box: Box, args: tuple[str, ...], wanted: Callable[[KillPoint], bool], nth: int = 0
) -> KillPoint:
    """The kill point of `args` on (a copy of) `box` that `wanted` picks."""
    probe = box.copy(box.root.parent / f"probe-{os.urandom(4).hex()}")
    points = [p for p in kill_points(probe.command(*args), probe.state, probe.root, probe.env())]
    found = [p for p in points if wanted(p)]
    assert len(found) > nth, f"no such kill point among {[str(p) for p in points]}"
    return found[nth]


def kill_at(box: Box, args: tuple[str, ...], point: KillPoint) -> None:
    done = run_killed(box.command(*args), point, box.root, box.env())
    assert done.returncode == -signal.SIGKILL, f"{point} not reached: {done.stderr!r}"


def inject_error(box: Box, args: tuple[str, ...], point: KillPoint, errno_name: str):
    cmd = [*STRACE, "-o", "/dev/null", "-e", f"trace={point.syscall}"]
    cmd += ["-e", f"inject={point.syscall}:error={errno_name}:when={point.n}"]
    return subprocess.run(
        [*cmd, *box.command(*args)],
        cwd=box.root,
        env=box.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- 1. a stray temp `current` symlink ------------------------------------------------


@pytest.mark.parametrize("command", ["apply", "rollback"])
def test_a_kill_before_the_flip_rename_leaves_a_box_that_finishes_on_retry(
    box: Box, author: Author, command: str
) -> None:
    box.ok("update", "apply", str(author.v3))
    if command == "apply":
        args: tuple[str, ...] = ("update", "apply", str(author.v4))
        old, new = 3, 4
    else:
        box.ok("update", "apply", str(author.v4))
        args, old, new = ("update", "rollback", MODEL), 4, 3
    flip = point_of(box, args, lambda p: p.syscall == "rename" and ".current." in p.target)
    kill_at(box, args, flip)
    assert any(p.is_symlink() for p in (box.state / "models" / MODEL).glob(".current.*"))
    assert box.active_version() == old  # status works, and says what serves
    assert strays(box.state) == []
    assert serving_path_version(box) == old
    box.ok(*args)  # the retry finishes the job
    assert box.active_version() == new
    with serve(box, "srv") as server:
        assert served_version(server.url) == str(new)
        assert "installed model not loaded" not in server.log()


def test_a_fixed_name_current_temp_left_by_an_earlier_version_is_removed(
    box: Box, author: Author
) -> None:
    box.ok("update", "apply", str(author.v3))
    folder = box.state / "models" / MODEL
    os.symlink("slots/a", folder / ".current.tmp")  # what the old code left behind
    assert box.active_version() == 3
    assert not (folder / ".current.tmp").is_symlink()
    box.ok("update", "apply", str(author.v4))
    assert box.active_version() == 4


# -- 2, 6. a fresh box: the first apply killed while writing the master key -------------


def test_status_works_on_a_fresh_box_without_any_key(box: Box) -> None:
    assert box.status() == []


def test_a_kill_while_writing_the_first_master_key_leaves_no_empty_key(
    box: Box, author: Author
) -> None:
    args = ("update", "apply", str(author.v3))
    kill_at(box, args, point_of(box, args, lambda p: p.syscall == "write"))  # write #1
    assert not (box.state / "keys" / "master.key").exists()
    assert box.status() == []
    assert strays(box.state) == []
    box.ok(*args)
    assert box.active_version() == 3
    assert serving_path_version(box) == 3


def test_an_empty_master_key_left_by_an_earlier_version_is_replaced_when_unused(
    box: Box, author: Author
) -> None:
    (box.state / "keys").mkdir(parents=True, mode=0o700)
    (box.state / "keys" / "master.key").touch(mode=0o600)  # the old code's leftover
    box.ok("update", "apply", str(author.v3))
    assert len(master_key_ids(box.state)) == 1
    assert payload_key_ids(box.state) == master_key_ids(box.state)


def test_an_empty_master_key_that_stored_models_need_is_refused_loudly(
    box: Box, author: Author
) -> None:
    box.ok("update", "apply", str(author.v3))
    (box.state / "keys" / "master.key").write_bytes(b"")  # the key of stored payloads lost
    assert box.active_version() == 3  # status needs no key
    assert (box.state / "keys" / "master.key").exists()  # never silently replaced
    refused = box.cli("update", "apply", str(author.v4))
    assert refused.returncode == 1
    assert "master.key is empty" in refused.stderr and "backup" in refused.stderr


@pytest.mark.parametrize("content", [b"c2hvcnQ=\n", os.urandom(31)], ids=["base64", "raw"])
def test_a_master_key_of_the_wrong_length_is_refused_loudly(
    box: Box, author: Author, content: bytes
) -> None:
    box.ok("update", "apply", str(author.v3))
    (box.state / "keys" / "master.key").write_bytes(content)
    refused = box.cli("update", "apply", str(author.v4))
    assert refused.returncode == 1 and "32-byte key" in refused.stderr
    assert (box.state / "keys" / "master.key").read_bytes() == content


# -- 3. keys rotate killed while writing the new key -----------------------------------


def test_a_kill_while_rotate_writes_the_new_key_is_finished_by_a_rerun(
    box: Box, author: Author
) -> None:
    box.ok("update", "apply", str(author.v3))
    args = ("keys", "rotate")
    kill_at(box, args, point_of(box, args, lambda p: p.syscall == "write"))
    assert not (box.state / "keys" / "master.key.next").exists()
    assert box.active_version() == 3  # the next entry point's recovery cleans up
    assert strays(box.state) == []
    assert serving_path_version(box) == 3
    box.ok(*args)
    assert master_key_ids(box.state) == payload_key_ids(box.state)


def test_an_empty_next_key_left_by_an_earlier_version_does_not_wedge_rotation(
    box: Box, author: Author
) -> None:
    box.ok("update", "apply", str(author.v3))
    (box.state / "keys" / "master.key.next").touch(mode=0o600)
    box.ok("keys", "rotate")
    assert not (box.state / "keys" / "master.key.next").exists()
    assert master_key_ids(box.state) == payload_key_ids(box.state)
    assert serving_path_version(box) == 3


# -- 4. a kill at the first install's mkdir ---------------------------------------------


def test_a_kill_before_slots_exists_is_finished_by_apply_and_by_upload(
    box: Box, author: Author, tmp_path: Path
) -> None:
    args = ("update", "apply", str(author.v3))
    point = point_of(box, args, lambda p: p.syscall == "mkdir" and p.target.endswith("/slots"))
    kill_at(box, args, point)
    assert not (box.state / "models" / MODEL / "slots").exists()
    second = box.copy(tmp_path / "second")
    box.ok(*args)
    assert box.active_version() == 3
    with serve(second, "srv") as server:
        assert upload(server.url, author.v3).status_code == 201
        assert served_version(server.url) == "3"


# -- 5. upload temp files of a killed server -------------------------------------------


def test_an_upload_cut_by_a_server_kill_leaves_no_file_after_the_next_start(
    box: Box, author: Author
) -> None:
    incoming = box.state / "incoming"
    with serve(box, "srv1") as server, socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"POST /api/models/{MODEL}/bundles HTTP/1.1\r\nhost: x\r\n"
            "content-type: application/octet-stream\r\n"
            f"content-length: {50 * 1024 * 1024}\r\n\r\n".encode()
            + author.v3.read_bytes()[:65536]
        )
        wait_until(lambda: any(incoming.glob("*")), 30, "the upload's temp file")
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
    assert list(incoming.iterdir()) != []  # what the fault matrix found, up to 1 GiB each
    with serve(box, "srv2"):
        assert list(incoming.iterdir()) == []


# -- 7. an empty or short audit key ------------------------------------------------------


def test_a_kill_while_writing_the_audit_key_leaves_no_empty_hmac_key(
    box: Box, author: Author
) -> None:
    args = ("update", "apply", str(author.v3))
    point = point_of(box, args, lambda p: p.syscall == "write" and "audit.key" in p.target)
    kill_at(box, args, point)
    assert not (box.state / "keys" / "audit.key").exists()
    assert box.active_version() == 3
    assert strays(box.state) == []
    box.ok(*args)  # already installed: the retry succeeds
    box.ok("update", "apply", str(author.v4))
    assert len((box.state / "keys" / "audit.key").read_bytes()) == 32
    verified = box.cli("audit", "verify")
    assert verified.returncode == 0 and "not checked" not in verified.stderr


def test_an_empty_audit_key_that_signed_checkpoints_is_refused_not_trusted(
    box: Box, author: Author
) -> None:
    box.ok("update", "apply", str(author.v3))  # signs a checkpoint with a real key
    (box.state / "keys" / "audit.key").write_bytes(b"")
    verified = box.cli("audit", "verify")
    assert verified.returncode == 1 and "audit key refused" in verified.stderr
    assert "chain intact" not in verified.stdout


def test_an_empty_audit_key_that_signed_nothing_is_replaced(box: Box, author: Author) -> None:
    (box.state / "keys").mkdir(parents=True, mode=0o700)
    (box.state / "keys" / "audit.key").touch(mode=0o600)  # the old code's leftover
    box.ok("update", "apply", str(author.v3))
    assert len((box.state / "keys" / "audit.key").read_bytes()) == 32
    assert box.cli("audit", "verify").returncode == 0


def test_a_server_refuses_to_start_on_a_short_audit_key(box: Box, author: Author) -> None:
    box.ok("update", "apply", str(author.v3))
    (box.state / "keys" / "audit.key").write_bytes(b"0123456789")
    started = subprocess.run(
        box.command("serve"), cwd=box.root, env=box.env(), capture_output=True, text=True
    )
    assert started.returncode == 2
    assert "audit.key holds 10 bytes" in started.stderr and "Traceback" not in started.stderr


# -- 8. disk full after the flip ----------------------------------------------------------


def test_disk_full_on_the_journal_after_the_flip_reports_what_happened(
    box: Box, author: Author
) -> None:
    box.ok("update", "apply", str(author.v3))
    args = ("update", "apply", str(author.v4))
    point = point_of(
        box, args, lambda p: p.syscall == "write" and ".state.json." in p.target, nth=1
    )
    done = inject_error(box, args, point, "ENOSPC")
    assert done.returncode == 0, done.stderr
    assert "version 4 is active" in done.stderr and "No space left" in done.stderr
    doc = box.status()[0]
    assert doc["slots"][doc["active"]]["version"] == 4 and doc["pending"] is None
    assert "completed after a crash" in doc["history"][-1]["reason"]
    again = box.cli(*args)
    assert again.returncode == 0 and "already installed" in again.stdout


@contextlib.contextmanager
def serve(box: Box, name: str) -> Iterator[RunningServer]:
    """A real server on the box's state (own folder for its config and log)."""
    (box.root / name).mkdir()
    with run_server(box.root / name, config_text=_server_config(box)) as server:
        yield server


def _server_config(box: Box) -> str:
    """The box's config as a `run_server` config_text (its port filled in by run_server)."""
    return re.sub(r"(?m)^port = .*$", "port = {port}", box.config.read_text(), count=1)
