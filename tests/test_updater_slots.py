"""The dual-slot store: install, probation, boot counter, rollback, at-rest, rotation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_updater_kit import Kit, validate_with_onnxruntime
from updater import (
    DecryptionFailed,
    MasterKey,
    SlotStore,
    StoreError,
    file_key_id,
)

NAME = "digits"


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)


def install(store: SlotStore, kit: Kit, version: int, **kw: object):  # type: ignore[no-untyped-def]
    return store.install(kit.bundle(version), validate=validate_with_onnxruntime, **kw)  # type: ignore[arg-type]


def served_version(store: SlotStore) -> int:
    manifest, files = store.load_current(NAME)
    assert files["model.onnx"]
    return manifest.version


def test_installs_alternate_slots_and_keep_the_previous_version(kit: Kit) -> None:
    store = kit.store()
    assert install(store, kit, 1).slot == "a"
    result = install(store, kit, 2)
    assert (result.slot, result.previous_version) == ("b", 1)
    state = store.state(NAME)
    assert (state.active, state.previous, state.active_version, state.previous_version) == (
        "b",
        "a",
        2,
        1,
    )
    assert os.readlink(kit.state_dir / "models" / NAME / "current") == "slots/b"
    assert state.verdict == "probation" and state.probation and state.probation.version == 2
    assert [h.event for h in state.history] == ["install", "install"]
    assert served_version(store) == 2
    assert install(store, kit, 3).slot == "a"  # the idle slot (old previous) is reused


def test_loaded_files_equal_the_bundle_plaintext(kit: Kit) -> None:
    store = kit.store()
    bundle = kit.bundle(1)
    from updater import verify_bundle

    expected = verify_bundle(bundle, kit.policy()).files
    store.install(bundle, validate=validate_with_onnxruntime)
    manifest, files = store.load_current(NAME)
    assert files == dict(expected)
    validate_with_onnxruntime(files, manifest)


def test_no_plaintext_model_anywhere_in_the_state_tree(kit: Kit) -> None:
    store = kit.store()
    install(store, kit, 1)
    _, files = store.load_current(NAME)
    model = files["model.onnx"]
    for path in (kit.state_dir).rglob("*"):
        if path.is_file():
            disk = path.read_bytes()
            for offset in range(0, len(model) - 32, 4093):
                assert model[offset : offset + 32] not in disk, path
            assert path.stat().st_mode & 0o077 == 0, path


def test_confirm_ends_probation(kit: Kit) -> None:
    store = kit.store()
    install(store, kit, 1)
    state = store.confirm(NAME)
    assert state.verdict == "confirmed" and state.probation is None
    assert store.record_boot(NAME).probation is None  # boots no longer count


def test_unconfirmed_boots_roll_back_automatically(kit: Kit) -> None:
    store = kit.store(max_unconfirmed_boots=2)
    install(store, kit, 1)
    store.confirm(NAME)
    install(store, kit, 2)
    assert store.record_boot(NAME).probation.boot_count == 1  # type: ignore[union-attr]
    assert store.record_boot(NAME).active_version == 2
    state = store.record_boot(NAME)  # the third start without a confirmation
    assert (state.active_version, state.verdict, state.previous) == (1, "rolled_back", None)
    assert state.history[-1].event == "rollback"
    assert "2 boots without confirmation" in state.history[-1].reason
    assert served_version(store) == 1
    assert state.versions_seen == 2  # the floor stays: version 2 cannot come back


def test_boot_limit_with_nothing_to_roll_back_to_keeps_serving(kit: Kit) -> None:
    store = kit.store(max_unconfirmed_boots=0)
    install(store, kit, 1)
    state = store.record_boot(NAME)
    assert (state.active_version, state.verdict) == (1, "unhealthy")
    assert served_version(store) == 1


def test_manual_rollback_records_the_reason_and_cannot_repeat(kit: Kit) -> None:
    store = kit.store()
    install(store, kit, 1)
    install(store, kit, 2)
    state = store.rollback(NAME, "p99 latency 812 ms over 250 ms")
    assert (state.active_version, state.verdict) == (1, "rolled_back")
    assert state.history[-1].reason == "p99 latency 812 ms over 250 ms"
    assert state.history[-1].version == 2
    with pytest.raises(StoreError, match="no previous version"):
        store.rollback(NAME, "again")
    assert install(store, kit, 3).slot == "b"  # overwrites the bad slot, not the good one


def test_deliberate_downgrade_is_allowed_and_recorded(kit: Kit) -> None:
    store = kit.store()
    install(store, kit, 1)
    install(store, kit, 5)
    result = install(store, kit, 4, allow_downgrade=True, reason="ticket 42")
    assert result.downgrade
    state = store.state(NAME)
    assert state.history[-1].event == "downgrade" and state.history[-1].reason == "ticket 42"
    assert state.versions_seen == 5


def test_unknown_model_is_a_store_error(kit: Kit) -> None:
    with pytest.raises(StoreError, match="no model named"):
        kit.store().load_current("nothing")
    with pytest.raises(StoreError, match="not a valid model name"):
        kit.store().state("../etc")


def test_moved_slot_payload_does_not_decrypt(kit: Kit) -> None:
    store = kit.store()
    install(store, kit, 1)
    install(store, kit, 2)
    slots = kit.state_dir / "models" / NAME / "slots"
    (slots / "b" / "payload" / "model.onnx.enc").write_bytes(
        (slots / "a" / "payload" / "model.onnx.enc").read_bytes()
    )
    with pytest.raises(DecryptionFailed) as err:
        store.load_current(NAME)
    assert err.value.reason == "moved"


def test_store_opened_with_the_wrong_master_key_fails_clearly(kit: Kit) -> None:
    install(kit.store(), kit, 1)
    other = SlotStore(kit.state_dir, MasterKey.generate(), kit.policy())
    with pytest.raises(DecryptionFailed) as err:
        other.load_current(NAME)
    assert err.value.reason == "wrong_key" and kit.master.key_id in err.value.message


def test_master_key_rotation_reencrypts_both_slots(kit: Kit) -> None:
    store = kit.store()
    install(store, kit, 1)
    install(store, kit, 2)
    new = MasterKey.generate()
    assert store.rotate_master_key(new) == 2
    assert store.rotate_master_key(new) == 0
    payloads = list((kit.state_dir / "models").rglob("*.enc"))
    assert {file_key_id(p) for p in payloads} == {new.key_id}
    fresh = SlotStore(kit.state_dir, new, kit.policy())  # a restart with only the new key
    assert served_version(fresh) == 2
    fresh.rollback(NAME, "check the previous slot too")
    assert served_version(fresh) == 1


def test_health_watch_verdict_drives_an_automatic_rollback(kit: Kit) -> None:
    from updater import HealthPolicy, HealthWatch

    store = kit.store()
    install(store, kit, 1)
    install(store, kit, 2)
    watch = HealthWatch(HealthPolicy(min_requests=10, max_error_rate=0.1), started_s=0.0)
    for i in range(10):
        watch.observe(ok=i % 2 == 0, row_ms=3.0)  # the new model fails half its requests
    verdict = watch.verdict(now_s=5.0)
    assert verdict.action == "rollback"
    state = store.rollback(NAME, verdict.reason)
    assert state.active_version == 1
    assert state.history[-1].reason == "error rate 50.0% over 10.0% (5 of 10 requests)"
