"""Bundle format: create, inspect, verify; strict manifests; tar safety; key wrapping."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.test_updater_kit import Kit
from updater import (
    BundlePolicy,
    BundleRejected,
    FleetKey,
    TrustedKeys,
    inspect_bundle,
    read_bundle,
    verify_bundle,
    write_bundle,
)


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path)


def resign(kit: Kit, bundle: Path, edit: Callable[[bytes], bytes]) -> Path:
    """A bundle whose manifest was edited and re-signed by the trusted key."""
    raw = read_bundle(bundle, 10**9, 10**9)
    manifest = edit(raw.manifest_bytes)
    out = bundle.with_name("resigned.bundle")
    write_bundle(out, manifest, kit.signing.sign(manifest), raw.payloads)
    return out


def edit_json(change: Callable[[dict], None]) -> Callable[[bytes], bytes]:  # type: ignore[type-arg]
    def edit(raw: bytes) -> bytes:
        data = json.loads(raw)
        change(data)
        return json.dumps(data).encode()

    return edit


def test_bundle_round_trip_for_a_fleet_key(kit: Kit) -> None:
    path = kit.bundle(3)
    with tarfile.open(path) as tar:
        assert tar.getnames() == ["manifest.json", "manifest.sig", "payload/model.onnx.enc"]
        payload = tar.extractfile("payload/model.onnx.enc").read()  # type: ignore[union-attr]
    manifest = inspect_bundle(path, kit.policy().trusted_keys)
    assert (manifest.model, manifest.version, manifest.backend) == ("digits", 3, "onnxruntime")
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("x", "FP32", (-1, 4))]
    assert manifest.samples[0].expected["y"] == (3.0, 6.0, -9.0, 1.5)
    assert "[[inputs]]" in manifest.model_config
    verified = verify_bundle(path, kit.policy())
    model = verified.files["model.onnx"]
    assert model[100:132] not in payload and model[-32:] not in payload
    assert manifest.file("model.onnx").size == len(model)


def test_device_bundle_opens_only_on_that_device(kit: Kit) -> None:
    path = kit.bundle(2, recipient=kit.device.public_key)  # type: ignore[arg-type]
    assert verify_bundle(path, kit.policy()).manifest.data_key.scheme.startswith("x25519")
    other_box = BundlePolicy(TrustedKeys([kit.signing.public_key()]), [FleetKey.generate()])
    with pytest.raises(BundleRejected) as err:
        verify_bundle(path, other_box)
    assert err.value.reason == "not_for_this_device"


def test_inspect_refuses_an_untrusted_signer(kit: Kit) -> None:
    path = kit.bundle(1)
    with pytest.raises(BundleRejected) as err:
        inspect_bundle(path, TrustedKeys([]))
    assert err.value.reason == "bad_signature"
    assert "none configured" in err.value.message


def _dup_key(raw: bytes) -> bytes:
    return raw[:-1] + b',"version":99}'


@pytest.mark.parametrize(
    ("edit", "reason", "words"),
    [
        (edit_json(lambda d: d.update(extra=1)), "bad_manifest", "unknown field(s) extra"),
        (edit_json(lambda d: d.pop("files")), "bad_manifest", "missing field(s) files"),
        (edit_json(lambda d: d.update(version="3")), "bad_manifest", "version"),
        (edit_json(lambda d: d.update(version=True)), "bad_manifest", "version"),
        (edit_json(lambda d: d.update(version=0)), "bad_manifest", "version"),
        (edit_json(lambda d: d.update(model="../etc")), "bad_manifest", "model"),
        (edit_json(lambda d: d.update(model="digits\n")), "bad_manifest", "model"),
        (
            edit_json(lambda d: d.update(version=-1)),
            "bad_manifest",
            "version: must be >= 1, got -1",
        ),
        (edit_json(lambda d: d.update(created="yesterday")), "bad_manifest", "created"),
        (edit_json(lambda d: d.update(created="2026-01-01T00:00:00")), "bad_manifest", "zone"),
        (edit_json(lambda d: d["files"][0].update(sha256="AB" * 32)), "bad_manifest", "sha256"),
        (edit_json(lambda d: d["files"][0].update(name="a/b")), "bad_manifest", "files[0].name"),
        (edit_json(lambda d: d["inputs"][0].update(datatype="FP128")), "bad_manifest", "datatype"),
        (
            edit_json(lambda d: d["samples"][0]["inputs"]["x"].update(shape=[2, 4])),
            "bad_manifest",
            "shape",
        ),
        (edit_json(lambda d: d["samples"][0].update(tolerance=-1)), "bad_manifest", "tolerance"),
        (edit_json(lambda d: d.update(format_version=2)), "unsupported_format", "format 2"),
        (_dup_key, "bad_manifest", "appears twice"),
        (lambda raw: raw.replace(b'"tolerance":1e-05', b'"tolerance":NaN'), "bad_manifest", "NaN"),
        (lambda raw: b"\xff" + raw, "bad_manifest", "UTF-8"),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_malformed_manifests_are_refused_even_when_signed(
    kit: Kit, edit: Callable[[bytes], bytes], reason: str, words: str
) -> None:
    path = resign(kit, kit.bundle(3), edit)
    with pytest.raises(BundleRejected) as err:
        verify_bundle(path, kit.policy())
    assert err.value.reason == reason
    assert words in err.value.message


def test_manifest_naming_another_signing_key_is_refused(kit: Kit) -> None:
    path = resign(kit, kit.bundle(3), edit_json(lambda d: d.update(signing_key_id="0" * 16)))
    with pytest.raises(BundleRejected, match="different signing key"):
        verify_bundle(path, kit.policy())


def test_wrapped_key_cannot_be_lifted_into_another_version(kit: Kit) -> None:
    path = resign(kit, kit.bundle(3), edit_json(lambda d: d.update(version=4)))
    with pytest.raises(BundleRejected) as err:
        verify_bundle(path, kit.policy())
    assert err.value.reason == "unwrap_failed"


def test_expiry_is_checked_against_the_clock(kit: Kit) -> None:
    soon = datetime.now(timezone.utc) + timedelta(hours=1)
    path = kit.bundle(2, expires=soon)
    verify_bundle(path, kit.policy())
    with pytest.raises(BundleRejected) as err:
        verify_bundle(path, kit.policy(), now=soon + timedelta(seconds=1))
    assert err.value.reason == "expired"


def test_version_floor_and_explicit_downgrade(kit: Kit) -> None:
    path = kit.bundle(4)
    for floor in (4, 5):
        with pytest.raises(BundleRejected) as err:
            verify_bundle(path, kit.policy(), newest_installed=floor)
        assert err.value.reason == "not_newer"
    verify_bundle(path, kit.policy(), newest_installed=5, allow_downgrade=True)
    verify_bundle(path, kit.policy(), newest_installed=lambda model: 3)


# -- tar safety -----------------------------------------------------------------------


def craft(path: Path, kit: Kit, extra: list[tarfile.TarInfo], data: bytes = b"x") -> Path:
    """A real bundle's members followed by hand-made hostile entries."""
    good = kit.bundle(5)
    out = path / "crafted.bundle"
    with tarfile.open(good) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
        for info in extra:
            dst.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, link, 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (_info("/etc/cron.d/x"), "unsafe_path"),
        (_info("payload/../../evil.enc"), "unsafe_path"),
        (_info("../manifest.json"), "unsafe_path"),
        (_info("payload/.hidden.enc"), "unsafe_path"),
        (_info("payload//model.onnx.enc"), "unsafe_path"),
        (_info("payload/model.onnx.enc"), "duplicate_member"),
        (_info("payload/link.enc", tarfile.SYMTYPE, "/etc/shadow"), "unsafe_member"),
        (_info("payload/hard.enc", tarfile.LNKTYPE, "manifest.json"), "unsafe_member"),
        (_info("payload/dev.enc", tarfile.CHRTYPE), "unsafe_member"),
        (_info("payload/fifo.enc", tarfile.FIFOTYPE), "unsafe_member"),
        (_info("README.txt"), "unexpected_member"),
        (_info("payload/extra.enc"), "unexpected_member"),
    ],
    ids=lambda v: v.name if isinstance(v, tarfile.TarInfo) else v,
)
def test_hostile_archive_entries_are_refused(
    tmp_path: Path, kit: Kit, entry: tarfile.TarInfo, reason: str
) -> None:
    path = craft(tmp_path, kit, [entry])
    with pytest.raises(BundleRejected) as err:
        verify_bundle(path, kit.policy())
    assert err.value.reason == reason


def test_compressed_or_garbage_archives_are_refused(tmp_path: Path, kit: Kit) -> None:
    good = kit.bundle(2)
    gz = tmp_path / "b.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(good, arcname="manifest.json")
    garbage = tmp_path / "garbage.bundle"
    garbage.write_bytes(b"\0" * 10 + b"not a tar" * 100)
    for path in (gz, garbage):
        with pytest.raises(BundleRejected) as err:
            verify_bundle(path, kit.policy())
        assert err.value.reason in ("malformed_archive", "missing_member")


def test_size_caps_apply_to_the_bundle_and_to_each_file(kit: Kit) -> None:
    path = kit.bundle(2)
    size = path.stat().st_size
    with pytest.raises(BundleRejected) as err:
        verify_bundle(path, kit.policy(max_bundle_bytes=size - 1))
    assert err.value.reason == "too_large" and str(size) in err.value.message
    with pytest.raises(BundleRejected) as err:
        verify_bundle(path, kit.policy(max_file_bytes=100_000))
    assert err.value.reason == "too_large"
