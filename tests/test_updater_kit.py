"""Builders shared by the updater tests (real keys, real ONNX models, real bundles),
plus tests of the key handling they rely on.

Other updater test modules import `Kit` and friends from here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper

from updater import (
    BundlePolicy,
    DeviceKey,
    FleetKey,
    Manifest,
    MasterKey,
    MasterKeyError,
    SampleMismatch,
    SampleTensor,
    SlotStore,
    TrustedKeys,
    ValidationSample,
    create_bundle,
    generate_signing_key,
    generate_unwrap_key_file,
    load_signing_key,
    parse_public_key,
    public_key_text,
    read_unwrap_key,
    run_samples,
    signing_key_id,
)

MODEL_TOML = """\
backend = "onnxruntime"
[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, 4]
[[outputs]]
name = "y"
datatype = "FP32"
shape = [-1, 4]
"""


def scale_model(scale: float, pad_bytes: int = 150_000) -> bytes:
    """A real ONNX model y = x * scale, padded with an unused initializer to span chunks."""
    pad = helper.make_tensor("pad", TensorProto.UINT8, [pad_bytes], os.urandom(pad_bytes), raw=True)
    k = helper.make_tensor("k", TensorProto.FLOAT, [1], [scale])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        [k, pad],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def sample_for(scale: float) -> ValidationSample:
    data = (1.0, 2.0, -3.0, 0.5)
    return ValidationSample(
        inputs={"x": SampleTensor("FP32", (1, 4), data)},
        expected={"y": tuple(v * scale for v in data)},
        tolerance=1e-5,
    )


def validate_with_onnxruntime(files: Mapping[str, bytes], manifest: Manifest) -> None:
    """What the server's validation does: load the model from bytes and run the samples."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the padding initializer is unused on purpose
    session = ort.InferenceSession(files["model.onnx"], options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    run_samples(manifest, lambda feeds: dict(zip(names, session.run(None, feeds), strict=True)))


@dataclass
class Kit:
    """Keys and a model folder in a tmp dir; builds bundles and stores on demand."""

    root: Path
    signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    fleet: FleetKey = field(default_factory=FleetKey.generate)
    device: DeviceKey = field(default_factory=DeviceKey.generate)
    master: MasterKey = field(default_factory=MasterKey.generate)
    built: int = 0

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    def policy(self, **limits: int) -> BundlePolicy:
        return BundlePolicy(
            TrustedKeys([self.signing.public_key()]), [self.fleet, self.device], **limits
        )

    def store(self, **kw: object) -> SlotStore:
        return SlotStore(self.state_dir, self.master, self.policy(), **kw)  # type: ignore[arg-type]

    def bundle(
        self,
        version: int,
        *,
        name: str = "digits",
        scale: float | None = None,
        model_bytes: bytes | None = None,
        sample_scale: float | None = None,
        signing: Ed25519PrivateKey | None = None,
        recipient: FleetKey | None = None,
        expires: datetime | None = None,
    ) -> Path:
        """A real signed bundle of model `name` version `version` (y = x * scale)."""
        scale = float(version) if scale is None else scale
        self.built += 1
        tag = f"{name}-{version}-{self.built}"
        model_dir = self.root / "src" / tag / name
        (model_dir / str(version)).mkdir(parents=True)
        (model_dir / "model.toml").write_text(MODEL_TOML)
        data = model_bytes if model_bytes is not None else scale_model(scale)
        (model_dir / str(version) / "model.onnx").write_bytes(data)
        out = self.root / f"{tag}.bundle"
        create_bundle(
            model_dir,
            version,
            signing or self.signing,
            recipient or self.fleet,
            out,
            samples=[sample_for(scale if sample_scale is None else sample_scale)],
            expires=expires or datetime.now(timezone.utc) + timedelta(days=30),
        )
        return out


def tree_digest(root: Path) -> str:
    """Hash of every name, type, mode, link target and file content under `root`."""
    h = hashlib.sha256()
    if not root.exists():
        return "absent"
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        h.update(f"{path.relative_to(root)}\0{st.st_mode}\0".encode())
        if path.is_symlink():
            h.update(os.readlink(path).encode())
        elif path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


# -- tests of the key helpers ---------------------------------------------------------


def test_trusted_keys_parse_from_base64_and_pem() -> None:
    key = Ed25519PrivateKey.generate()
    pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    trusted = TrustedKeys.from_texts([public_key_text(key), pem])
    assert list(trusted) == [signing_key_id(key.public_key())]
    assert trusted.verifying_key_id(b"m", key.sign(b"m")) == signing_key_id(key.public_key())
    assert trusted.verifying_key_id(b"m", Ed25519PrivateKey.generate().sign(b"m")) is None


@pytest.mark.parametrize("text", ["", "not base64!", "c2hvcnQ=", "-----BEGIN PUBLIC KEY-----\nx\n"])
def test_malformed_trusted_key_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="trusted key"):
        parse_public_key(text)


def test_signing_key_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    key = generate_signing_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_key_text(load_signing_key(path)) == public_key_text(key)
    path.chmod(0o644)
    with pytest.raises(MasterKeyError, match="chmod 600"):
        load_signing_key(path)


def test_the_kit_model_runs_and_validates() -> None:
    files = {"model.onnx": scale_model(3.0, pad_bytes=10)}
    manifest_like = type("M", (), {"samples": [sample_for(3.0)]})()
    validate_with_onnxruntime(files, manifest_like)  # type: ignore[arg-type]
    bad = type("M", (), {"samples": [sample_for(2.0)]})()
    with pytest.raises(SampleMismatch, match="sample 0: output y differs by 3, more than"):
        validate_with_onnxruntime(files, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["fleet", "x25519"])
def test_bundle_key_files_are_private_and_round_trip(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.key"
    key = generate_unwrap_key_file(path, kind)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_unwrap_key(path).key_id == key.key_id
    with pytest.raises(FileExistsError):
        generate_unwrap_key_file(path, kind)
    path.chmod(0o640)
    with pytest.raises(MasterKeyError, match="chmod 600"):
        read_unwrap_key(path)
