"""Crash safety with real processes: an install (or rollback) runs in a subprocess that
SIGKILLs itself at a named step (`UPDATER_CRASH_AT`); reopening the store must give the
old or the new version, whole, a journal that agrees with `current`, and a retry works."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_updater_kit import Kit, validate_with_onnxruntime
from updater import (
    MasterKey,
    SlotStore,
    StoreError,
    file_key_id,
    public_key_text,
    verify_bundle,
)

NAME = "digits"

WORKER = textwrap.dedent(
    """
    import base64, sys
    from pathlib import Path
    from updater import BundlePolicy, FleetKey, MasterKey, SlotStore, TrustedKeys
    state, master, fleet, trusted, op, arg = sys.argv[1:7]
    policy = BundlePolicy(TrustedKeys.from_texts([trusted]), [FleetKey(base64.b64decode(fleet))])
    store = SlotStore(Path(state), MasterKey(base64.b64decode(master)), policy)
    if op == "install":
        store.install(Path(arg), validate=lambda files, manifest: None)
    elif op == "rotate":
        store.rotate_master_key(MasterKey(base64.b64decode(arg)))
    else:
        store.rollback("digits", arg)
    """
)


def worker(kit: Kit, op: str, arg: str, crash_at: str | None = None) -> subprocess.Popen[bytes]:
    """Start an updater operation in its own process (optionally crashing at a step)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UPDATER_CRASH")}
    if crash_at:
        env["UPDATER_CRASH_AT"] = crash_at
    args = [
        str(kit.state_dir),
        base64.b64encode(kit.master.key).decode(),
        kit.fleet.text(),
        public_key_text(kit.signing),
        op,
        arg,
    ]
    return subprocess.Popen([sys.executable, "-c", WORKER, *args], env=env)


def run_worker(kit: Kit, op: str, arg: str, crash_at: str | None) -> int:
    return worker(kit, op, arg, crash_at).wait(timeout=120)


def assert_consistent(kit: Kit, store: SlotStore) -> int:
    """Journal, `current` and slot folders agree, and the serving version decrypts whole."""
    state = store.state(NAME)
    folder = kit.state_dir / "models" / NAME
    assert state.pending is None
    assert os.readlink(folder / "current") == f"slots/{state.active}"
    assert not list((folder / "slots").glob(".*")), "temp slot left behind"
    for slot, record in state.slots.items():
        assert (folder / "slots" / slot).exists() == (record is not None), slot
    manifest, files = store.load_current(NAME)
    assert manifest.version == state.active_version
    validate_with_onnxruntime(files, manifest)  # complete and the right model for its samples
    if state.previous:
        assert state.previous_version is not None and state.previous_version < manifest.version
    return manifest.version


INSTALL_STEPS = [
    ("during_write", 1),
    ("after_write", 1),
    ("after_fsync", 1),
    ("before_flip", 1),
    ("after_flip", 2),
    ("during_probation", 2),
]


@pytest.mark.parametrize(
    ("step", "serving_after"), INSTALL_STEPS, ids=[s for s, _ in INSTALL_STEPS]
)
def test_install_killed_at_each_step_leaves_one_whole_version(
    tmp_path: Path, step: str, serving_after: int
) -> None:
    kit = Kit(tmp_path)
    store = kit.store()
    store.install(kit.bundle(1), validate=validate_with_onnxruntime)
    store.confirm(NAME)
    v2 = kit.bundle(2)
    v2_files = verify_bundle(v2, kit.policy()).files

    assert run_worker(kit, "install", str(v2), step) == -signal.SIGKILL

    reopened = kit.store()
    assert assert_consistent(kit, reopened) == serving_after
    state = reopened.state(NAME)
    if serving_after == 2:
        assert reopened.load_current(NAME)[1] == dict(v2_files)
        assert (state.previous_version, state.verdict, state.versions_seen) == (1, "probation", 2)
        if step == "after_flip":  # the flip happened, the journal did not: recovery finished it
            assert "after a crash" in state.history[-1].reason
        # The crashed version is still on probation: unconfirmed boots take it back out.
        for _ in range(reopened.max_unconfirmed_boots + 1):
            reopened.record_boot(NAME)
        assert assert_consistent(kit, reopened) == 1
        retry = kit.bundle(3)
    else:
        assert state.history[-1].event == "aborted"
        assert state.versions_seen == 1  # an interrupted install does not raise the floor
        retry = v2
    assert run_worker(kit, "install", str(retry), None) == 0
    assert assert_consistent(kit, kit.store()) == (3 if serving_after == 2 else 2)


def test_first_install_killed_before_the_flip_leaves_an_empty_model(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    v1 = kit.bundle(1)
    assert run_worker(kit, "install", str(v1), "before_flip") == -signal.SIGKILL
    store = kit.store()
    state = store.state(NAME)
    assert state.active is None and state.pending is None and state.slots == {"a": None, "b": None}
    with pytest.raises(StoreError, match="no installed version"):
        store.load_current(NAME)
    assert run_worker(kit, "install", str(v1), None) == 0
    assert assert_consistent(kit, kit.store()) == 1


@pytest.mark.parametrize(
    ("step", "serving_after"), [("rollback_before_flip", 2), ("rollback_after_flip", 1)]
)
def test_rollback_killed_midway_is_finished_or_undone(
    tmp_path: Path, step: str, serving_after: int
) -> None:
    kit = Kit(tmp_path)
    store = kit.store()
    store.install(kit.bundle(1), validate=validate_with_onnxruntime)
    store.install(kit.bundle(2), validate=validate_with_onnxruntime)

    assert run_worker(kit, "rollback", "error rate 40%", step) == -signal.SIGKILL

    reopened = kit.store()
    assert assert_consistent(kit, reopened) == serving_after
    if serving_after == 2:
        assert run_worker(kit, "rollback", "error rate 40%", None) == 0
    state = kit.store().state(NAME)
    assert (state.active_version, state.verdict) == (1, "rolled_back")
    assert state.history[-1].event == "rollback" and "error rate 40%" in state.history[-1].reason


@pytest.mark.parametrize("step", ["rotate_before_rename", "rotate_after_rename"])
def test_key_rotation_killed_midway_leaves_both_slots_readable(tmp_path: Path, step: str) -> None:
    kit = Kit(tmp_path)
    store = kit.store()
    store.install(kit.bundle(1), validate=validate_with_onnxruntime)
    store.install(kit.bundle(2), validate=validate_with_onnxruntime)
    new = MasterKey.generate()

    assert run_worker(kit, "rotate", base64.b64encode(new.key).decode(), step) == -signal.SIGKILL

    both = SlotStore(kit.state_dir, [new, kit.master], kit.policy())
    payloads = sorted((kit.state_dir / "models").rglob("*.enc"))
    assert len(payloads) == 2
    assert assert_consistent(kit, both) == 2
    assert run_worker(kit, "rotate", base64.b64encode(new.key).decode(), None) == 0
    assert {file_key_id(p) for p in payloads} == {new.key_id}
    only_new = SlotStore(kit.state_dir, new, kit.policy())
    assert assert_consistent(kit, only_new) == 2
    only_new.rollback(NAME, "read the other slot with the new key")
    assert assert_consistent(kit, only_new) == 1


def test_concurrent_installs_are_serialised(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    kit.store().install(kit.bundle(1), validate=validate_with_onnxruntime)
    procs = [worker(kit, "install", str(kit.bundle(v))) for v in (2, 3)]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes[1] == 0  # v3 always lands; v2 lands first or is refused as not newer
    state = kit.store().state(NAME)
    assert (state.versions_seen, state.active_version) == (3, 3)
    assert assert_consistent(kit, kit.store()) == 3
