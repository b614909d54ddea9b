"""At-rest encryption: chunked AES-256-GCM, bound to model/version/name, keys and rotation."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from updater.atrest import (
    HEADER_BYTES,
    TAG_BYTES,
    FileContext,
    decrypt_bytes,
    decrypt_to_bytes,
    encrypt_bytes,
    file_key_id,
    rotate_file,
    write_encrypted,
)
from updater.errors import DecryptionFailed, MasterKeyError
from updater.fsync import remove_strays
from updater.masterkey import (
    MasterKey,
    generate_master_key_file,
    load_master_key,
    read_master_key_file,
)

CHUNK = 1024
CTX = FileContext("digits", 3, "model.onnx")


def tiny_onnx() -> bytes:
    """A real ONNX model (y = x * w) so 'no plaintext on disk' is checked on model bytes."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    model = helper.make_model(graph, producer_name="edgeserve-test-producer")
    return model.SerializeToString()


def chunks_of(blob: bytes) -> tuple[bytes, list[bytes]]:
    size = CHUNK + TAG_BYTES
    body = blob[HEADER_BYTES:]
    return blob[:HEADER_BYTES], [body[i : i + size] for i in range(0, len(body), size)]


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 70_001])
def test_round_trip_at_every_chunk_boundary(size: int) -> None:
    key = MasterKey.generate()
    data = os.urandom(size)
    assert decrypt_bytes(encrypt_bytes(data, key, CTX, CHUNK), key, CTX) == data


def test_no_plaintext_model_bytes_on_disk(tmp_path: Path) -> None:
    model = tiny_onnx()
    key = MasterKey.generate()
    path = tmp_path / "model.onnx.enc"
    write_encrypted(path, model, key, CTX)
    disk = path.read_bytes()
    assert b"edgeserve-test-producer" not in disk
    assert b"MatMul" not in disk
    # No 16-byte window of the model (header, graph or weights) appears on disk.
    for offset in range(0, len(model) - 16, 97):
        assert model[offset : offset + 16] not in disk
    assert decrypt_to_bytes(path, key, CTX) == model
    assert path.stat().st_mode & 0o777 == 0o600


def test_same_plaintext_twice_gives_unrelated_ciphertexts() -> None:
    key = MasterKey.generate()
    a, b = encrypt_bytes(b"x" * 5000, key, CTX), encrypt_bytes(b"x" * 5000, key, CTX)
    assert a[HEADER_BYTES:][:64] != b[HEADER_BYTES:][:64]


def test_wrong_key_fails_and_names_both_key_ids() -> None:
    key, other = MasterKey.generate(), MasterKey.generate()
    blob = encrypt_bytes(b"weights", key, CTX)
    with pytest.raises(DecryptionFailed) as err:
        decrypt_bytes(blob, other, CTX)
    assert err.value.reason == "wrong_key"
    assert key.key_id in err.value.message and other.key_id in err.value.message
    assert base64.b64encode(key.key).decode() not in err.value.message


@pytest.mark.parametrize(
    "moved_to",
    [
        FileContext("other-model", 3, "model.onnx"),
        FileContext("digits", 2, "model.onnx"),
        FileContext("digits", 3, "model.bin"),
    ],
    ids=["other-name", "other-version", "other-file"],
)
def test_file_moved_to_another_model_version_or_name_fails(moved_to: FileContext) -> None:
    key = MasterKey.generate()
    blob = encrypt_bytes(b"weights", key, CTX)
    with pytest.raises(DecryptionFailed) as err:
        decrypt_bytes(blob, key, moved_to)
    assert err.value.reason == "moved"
    assert "cannot be moved" in err.value.message


def test_forged_context_fingerprint_still_fails_authentication() -> None:
    key = MasterKey.generate()
    blob = bytearray(encrypt_bytes(b"weights" * 500, key, CTX))
    target = FileContext("other", 3, "model.onnx")
    blob[21:29] = target.fingerprint()  # the header is bound into every chunk's AAD
    with pytest.raises(DecryptionFailed) as err:
        decrypt_bytes(bytes(blob), key, target)
    assert err.value.reason == "tampered"


def _reorder(header: bytes, chunks: list[bytes]) -> bytes:
    return header + chunks[1] + chunks[0] + b"".join(chunks[2:])


def _drop_last(header: bytes, chunks: list[bytes]) -> bytes:
    return header + b"".join(chunks[:-1])


def _drop_middle(header: bytes, chunks: list[bytes]) -> bytes:
    return header + chunks[0] + b"".join(chunks[2:])


def _append(header: bytes, chunks: list[bytes]) -> bytes:
    return header + b"".join(chunks) + chunks[-1]


def _cut_inside(header: bytes, chunks: list[bytes]) -> bytes:
    return (header + b"".join(chunks))[:-7]


def _flip_bit(header: bytes, chunks: list[bytes]) -> bytes:
    body = bytearray(b"".join(chunks))
    body[len(body) // 2] ^= 1
    return header + bytes(body)


@pytest.mark.parametrize(
    "attack", [_reorder, _drop_last, _drop_middle, _append, _cut_inside, _flip_bit]
)
def test_chunk_level_tampering_is_detected(attack) -> None:  # type: ignore[no-untyped-def]
    key = MasterKey.generate()
    blob = encrypt_bytes(os.urandom(4 * CHUNK + 100), key, CTX, CHUNK)
    header, chunks = chunks_of(blob)
    assert len(chunks) == 5
    with pytest.raises(DecryptionFailed) as err:
        decrypt_bytes(attack(header, chunks), key, CTX)
    assert err.value.reason == "tampered"


def test_plain_file_is_reported_as_not_encrypted(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(tiny_onnx())
    with pytest.raises(DecryptionFailed) as err:
        decrypt_to_bytes(path, MasterKey.generate(), CTX)
    assert err.value.reason == "not_encrypted"


# -- master key sources ---------------------------------------------------------------


def test_generated_key_file_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "master.key"
    key = generate_master_key_file(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_master_key_file(path) == key
    with pytest.raises(MasterKeyError, match="already exists"):
        generate_master_key_file(path)
    assert read_master_key_file(path) == key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_group_or_other_readable_key_file_is_refused_with_the_fix(
    tmp_path: Path, mode: int
) -> None:
    path = tmp_path / "master.key"
    generate_master_key_file(path)
    path.chmod(mode)
    with pytest.raises(MasterKeyError) as err:
        load_master_key(path, environ={})
    assert f"{mode:04o}" in err.value.message
    assert f"chmod 600 {path}" in err.value.message


def test_key_sources_in_order_file_then_credential_then_env(tmp_path: Path) -> None:
    file_key, cred_key, env_key = (MasterKey.generate() for _ in range(3))
    path = tmp_path / "master.key"
    path.write_bytes(base64.b64encode(file_key.key))
    path.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "edgeserve-master-key").write_bytes(cred_key.key)  # raw bytes also accepted
    env = {
        "CREDENTIALS_DIRECTORY": str(creds),
        "EDGESERVE_MASTER_KEY": base64.b64encode(env_key.key).decode(),
    }
    assert load_master_key(path, environ=env) == file_key
    assert load_master_key(tmp_path / "absent.key", environ=env) == cred_key
    loaded = load_master_key(None, environ={"EDGESERVE_MASTER_KEY": env["EDGESERVE_MASTER_KEY"]})
    assert loaded == env_key and loaded.source == "env:EDGESERVE_MASTER_KEY"
    with pytest.raises(MasterKeyError, match="no at-rest master key"):
        load_master_key(tmp_path / "absent.key", environ={})


def test_malformed_key_material_is_refused() -> None:
    with pytest.raises(MasterKeyError, match="32-byte key"):
        load_master_key(None, environ={"EDGESERVE_MASTER_KEY": "c2hvcnQ="})


# -- rotation -------------------------------------------------------------------------


def _files(root: Path, key: MasterKey, count: int) -> dict[Path, tuple[FileContext, bytes]]:
    files = {}
    for i in range(count):
        ctx = FileContext("digits", i + 1, "model.onnx")
        data = os.urandom(3000 + i * 700)
        path = root / f"f{i}.enc"
        write_encrypted(path, data, key, ctx)
        files[path] = (ctx, data)
    return files


def test_rotation_reencrypts_every_file_and_is_idempotent(tmp_path: Path) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    files = _files(tmp_path, old, 4)
    assert all(rotate_file(p, ctx, old, new) for p, (ctx, _) in files.items())
    assert not any(rotate_file(p, ctx, [old, new], new) for p, (ctx, _) in files.items())
    for path, (ctx, data) in files.items():
        assert file_key_id(path) == new.key_id
        assert decrypt_to_bytes(path, new, ctx) == data
        with pytest.raises(DecryptionFailed):
            decrypt_to_bytes(path, old, ctx)


ROTATE_SCRIPT = textwrap.dedent(
    """
    import base64, sys
    from pathlib import Path
    from updater.atrest import FileContext, rotate_file
    from updater.masterkey import MasterKey
    old = MasterKey(base64.b64decode(sys.argv[1]))
    new = MasterKey(base64.b64decode(sys.argv[2]))
    for i, name in enumerate(sys.argv[3:]):
        rotate_file(Path(name), FileContext("digits", i + 1, "model.onnx"), [old, new], new)
    """
)


@pytest.mark.parametrize("point", ["rotate_before_rename", "rotate_after_rename"])
def test_rotation_killed_midway_leaves_every_file_readable(tmp_path: Path, point: str) -> None:
    old, new = MasterKey.generate(), MasterKey.generate()
    files = _files(tmp_path, old, 5)
    argv = [base64.b64encode(k.key).decode() for k in (old, new)] + [str(p) for p in files]
    env = {**os.environ, "UPDATER_CRASH_AT": point, "UPDATER_CRASH_SKIP": "2"}
    proc = subprocess.run([sys.executable, "-c", ROTATE_SCRIPT, *argv], env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL

    ids = [file_key_id(p) for p in files]
    assert new.key_id in ids and old.key_id in ids  # really interrupted in the middle
    for path, (ctx, data) in files.items():
        assert decrypt_to_bytes(path, [old, new], ctx) == data

    env.pop("UPDATER_CRASH_AT")
    subprocess.run([sys.executable, "-c", ROTATE_SCRIPT, *argv], env=env, timeout=60, check=True)
    for path, (ctx, data) in files.items():
        assert decrypt_to_bytes(path, new, ctx) == data
    remove_strays(tmp_path)  # what recovery does at the next entry point
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
