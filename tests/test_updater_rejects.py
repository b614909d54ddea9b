"""The bad-bundle matrix: every refused bundle names its reason and leaves the store
byte-for-byte unchanged (the whole state tree is hashed before and after)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.test_updater_kit import Kit, tree_digest, validate_with_onnxruntime
from updater import BundleRejected, SlotStore, read_bundle, write_bundle


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    """A store with version 1 (previous) and 2 (active, confirmed) of `digits`."""
    kit = Kit(tmp_path)
    store = kit.store()
    store.install(kit.bundle(1), validate=validate_with_onnxruntime)
    store.install(kit.bundle(2), validate=validate_with_onnxruntime)
    store.confirm("digits")
    return kit


def _rewrite(path: Path, change: Callable[[str, bytes], bytes]) -> Path:
    """Copy a bundle tar, passing each member's bytes through `change` (no re-signing)."""
    out = path.with_name("tampered.bundle")
    with tarfile.open(path) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            data = change(member.name, src.extractfile(member).read())  # type: ignore[union-attr]
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return out


def wrong_signing_key(kit: Kit) -> Path:
    return kit.bundle(3, signing=Ed25519PrivateKey.generate())


def tampered_manifest(kit: Kit) -> Path:
    def change(name: str, data: bytes) -> bytes:
        return (
            data.replace(b'"tolerance":1e-05', b'"tolerance":100')
            if name.endswith("json")
            else data
        )

    return _rewrite(kit.bundle(3), change)


def tampered_payload(kit: Kit) -> Path:
    def change(name: str, data: bytes) -> bytes:
        if not name.startswith("payload/"):
            return data
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        return bytes(flipped)

    return _rewrite(kit.bundle(3), change)


def truncated(kit: Kit) -> Path:
    path = kit.bundle(3)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def digest_mismatch(kit: Kit) -> Path:
    """Signed by the trusted key, but the payload is not what the manifest lists."""
    path = kit.bundle(3)
    raw = read_bundle(path, 10**9, 10**9)
    manifest = json.loads(raw.manifest_bytes)
    manifest["files"][0]["sha256"] = hashlib.sha256(b"another model").hexdigest()
    body = json.dumps(manifest).encode()
    write_bundle(path, body, kit.signing.sign(body), raw.payloads)
    return path


def path_traversal(kit: Kit) -> Path:
    def change(name: str, data: bytes) -> bytes:
        return data

    path = _rewrite(kit.bundle(3), change)
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo("payload/../../../models/digits/current.enc")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    return path


CASES: list[tuple[str, Callable[[Kit], Path], str]] = [
    ("wrong signing key", wrong_signing_key, "bad_signature"),
    ("tampered manifest", tampered_manifest, "bad_signature"),
    ("tampered payload", tampered_payload, "decrypt_failed"),
    ("truncated file", truncated, "malformed_archive"),
    ("digest mismatch", digest_mismatch, "digest_mismatch"),
    ("older version", lambda k: k.bundle(1), "not_newer"),
    ("equal version", lambda k: k.bundle(2), "not_newer"),
    (
        "expired",
        lambda k: k.bundle(3, expires=datetime.now(timezone.utc) - timedelta(seconds=1)),
        "expired",
    ),
    ("wrong model name", lambda k: k.bundle(3, name="faces"), "wrong_model"),
    ("samples that fail", lambda k: k.bundle(3, sample_scale=7.0), "validation_failed"),
    ("not a model", lambda k: k.bundle(3, model_bytes=os.urandom(5000)), "validation_failed"),
    ("path traversal", path_traversal, "unsafe_path"),
    (
        "not for this box",
        lambda k: k.bundle(3, recipient=type(k.fleet).generate()),
        "not_for_this_device",
    ),
]


@pytest.mark.parametrize(("case", "build", "reason"), CASES, ids=[c[0] for c in CASES])
def test_bad_bundle_is_refused_and_the_store_is_untouched(
    kit: Kit, case: str, build: Callable[[Kit], Path], reason: str
) -> None:
    bundle = build(kit)
    before = tree_digest(kit.state_dir)
    with pytest.raises(BundleRejected) as err:
        kit.store().install(bundle, model="digits", validate=validate_with_onnxruntime)
    assert err.value.reason == reason, err.value.message
    assert err.value.message
    assert tree_digest(kit.state_dir) == before
    manifest, files = kit.store().load_current("digits")
    assert manifest.version == 2 and files["model.onnx"]


def test_bundle_over_the_cap_is_refused_and_the_store_is_untouched(kit: Kit) -> None:
    bundle = kit.bundle(3)
    before = tree_digest(kit.state_dir)
    small = SlotStore(kit.state_dir, kit.master, kit.policy(max_bundle_bytes=64 * 1024))
    with pytest.raises(BundleRejected) as err:
        small.install(bundle, validate=validate_with_onnxruntime)
    assert err.value.reason == "too_large"
    assert tree_digest(kit.state_dir) == before


def test_refused_first_install_creates_nothing(tmp_path: Path) -> None:
    kit = Kit(tmp_path)
    bad = kit.bundle(1, sample_scale=2.0)
    with pytest.raises(BundleRejected):
        kit.store().install(bad, validate=validate_with_onnxruntime)
    assert not kit.state_dir.exists()


def test_after_the_matrix_a_good_bundle_still_installs(kit: Kit) -> None:
    for _, build, _ in CASES[:4]:
        with pytest.raises(BundleRejected):
            kit.store().install(build(kit), validate=validate_with_onnxruntime)
    result = kit.store().install(kit.bundle(3), validate=validate_with_onnxruntime)
    assert (result.version, result.previous_version) == (3, 2)
