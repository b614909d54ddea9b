"""Open the model a Spark job scores with, once per executor process, without ever
skipping a check the first open made.

The cache is keyed on what the model *is* and on every trust input, not on its path:
a model folder by its files' identity (inode, size, mtime), a bundle by the digest of
the verified bundle file, the trusted keys and a hash of the job's key. So a later call
with another trusted key or job key opens the bundle again (and is refused when the
first open would have been), and a bundle replaced at the same path is read again.
The plaintext never leaves memory; the cache holds no key, only its SHA-256.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from edgeserve.errors import ModelNotFound
from edgeserve.runtime import Runtime, ThreadPlan, create_runtime
from edgeserve.serving.repository import ModelConfig, parse_model_config, read_model

BundleOpener = Callable[[str, bytes | None], tuple[str, dict[str, bytes]]]
MAX_CACHED_MODELS = 8  # versions a long-lived executor keeps before closing the oldest


@dataclass(frozen=True)
class BundleFingerprint:
    """What an opener vouches for without decrypting: equal fingerprints mean a full open
    would give the same model under the same trust inputs."""

    digest: str
    version: int | None = None
    model: str | None = None


class SparkModel(NamedTuple):
    """A loaded model and what it is: the version scored and a digest of its content."""

    runtime: Runtime
    config: ModelConfig
    name: str
    version: int | None
    digest: str


_MODELS: dict[tuple[Any, ...], SparkModel] = {}
_LOCK = threading.Lock()


def cached_model(
    source: str,
    version: int | None = None,
    backend: str = "auto",
    key: bytes | None = None,
    bundle_opener: BundleOpener | None = None,
) -> SparkModel:
    """The model from `source`, loaded at most once per process for the same content and
    trust inputs. An opener without `fingerprint` cannot vouch for the cache: every call
    opens the bundle again."""
    path = Path(source)
    if path.is_dir():
        folder = read_model(path)
        chosen = version or folder.config.default_version or max(folder.versions)
        if chosen not in folder.versions:
            raise ModelNotFound(f"model '{folder.name}' has no version {chosen} in {path}")
        stamp = _stat_stamp([path / "model.toml", *sorted((path / str(chosen)).iterdir())])
        cache_key: tuple[Any, ...] = ("folder", str(path.resolve()), chosen, backend, stamp)
        return _cached(cache_key, lambda: _load_folder(path, chosen, backend))
    if bundle_opener is None:
        raise ValueError(f"{source} is not a model folder; a bundle needs bundle_opener")
    fingerprint = getattr(bundle_opener, "fingerprint", None)
    if fingerprint is None:
        return _load_bundle(source, backend, key, bundle_opener, None)
    vouched: BundleFingerprint = fingerprint(source, key)
    key_hash = hashlib.sha256(key).hexdigest() if key is not None else None
    cache_key = ("bundle", str(path.resolve()), backend, vouched.digest, key_hash)
    return _cached(cache_key, lambda: _load_bundle(source, backend, key, bundle_opener, vouched))


def _cached(cache_key: tuple[Any, ...], load: Callable[[], SparkModel]) -> SparkModel:
    with _LOCK:
        found = _MODELS.get(cache_key)
        if found is None:
            found = load()  # a refusal raises here and caches nothing
            if len(_MODELS) >= MAX_CACHED_MODELS:
                _MODELS.pop(next(iter(_MODELS))).runtime.close()
            _MODELS[cache_key] = found
        return found


def _stat_stamp(paths: Sequence[Path]) -> tuple[tuple[str, int, int, int], ...]:
    stamps = []
    for p in paths:
        st = p.stat()
        stamps.append((p.name, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _threads() -> ThreadPlan:
    # one thread per call: Spark already runs one task per executor core
    return ThreadPlan(intra_op=1, inter_op=1)


def _content_digest(toml_text: str, files: dict[str, bytes]) -> str:
    h = hashlib.sha256(toml_text.encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def _load_folder(path: Path, version: int, backend: str) -> SparkModel:
    model = read_model(path)
    files = model.read_files(version)
    config = model.config
    chosen = config.backend if config.backend != "auto" else backend
    runtime = create_runtime(chosen, files, _threads(), model=model.name)
    toml_text = (path / "model.toml").read_text("utf-8")
    return SparkModel(runtime, config, model.name, version, _content_digest(toml_text, files))


def _load_bundle(
    source: str,
    backend: str,
    key: bytes | None,
    opener: BundleOpener,
    vouched: BundleFingerprint | None,
) -> SparkModel:
    toml_text, files = opener(source, key)
    config = parse_model_config(toml_text, f"{Path(source).name}/model.toml")
    chosen = config.backend if config.backend != "auto" else backend
    name = Path(source).stem
    runtime = create_runtime(chosen, files, _threads(), model=name)
    if vouched is None:
        return SparkModel(runtime, config, name, None, _content_digest(toml_text, files))
    return SparkModel(runtime, config, vouched.model or name, vouched.version, vouched.digest)


class SignedBundleOpener:
    """Opens an edgeserve bundle on an executor: the signature must verify against one
    of `trusted_keys` (as in [updater] trusted_keys), and the payload is decrypted in
    memory with the job's key, the text of a fleet or device key file
    (`fleet:<base64>` / `x25519:<base64>`). Picklable, so Spark ships it to executors.
    """

    def __init__(self, trusted_keys: Sequence[str]) -> None:
        self.trusted_keys = list(trusted_keys)
        self._seen: dict[tuple[Any, ...], BundleFingerprint] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"trusted_keys": self.trusted_keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["trusted_keys"])  # type: ignore[misc]

    def fingerprint(self, path: str, key: bytes | None) -> BundleFingerprint:
        """The signature checked against the trusted keys (again whenever the file
        changes); the digest of the verified file, bound to the trusted keys."""
        from updater.bundle import inspect_bundle
        from updater.signing import TrustedKeys

        _require_key(key)
        st = Path(path).stat()
        stamp = (str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp not in self._seen:
            manifest = inspect_bundle(Path(path), TrustedKeys.from_texts(self.trusted_keys))
            h = hashlib.sha256("\n".join(sorted(self.trusted_keys)).encode() + b"\0")
            with open(path, "rb") as f:  # the whole file: the signed manifest and payloads
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._seen[stamp] = BundleFingerprint(h.hexdigest(), manifest.version, manifest.model)
        return self._seen[stamp]

    def __call__(self, path: str, key: bytes | None) -> tuple[str, dict[str, bytes]]:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from updater.bundle import BundlePolicy, verify_bundle
        from updater.masterkey import parse_key_material
        from updater.signing import TrustedKeys
        from updater.wrapping import DeviceKey, FleetKey

        kind, _, body = _require_key(key).decode("ascii").strip().partition(":")
        material = parse_key_material(body.encode(), "the job's key")
        unwrap = (
            FleetKey(material)
            if kind == "fleet"
            else DeviceKey(X25519PrivateKey.from_private_bytes(material))
        )
        policy = BundlePolicy(TrustedKeys.from_texts(self.trusted_keys), [unwrap])
        verified = verify_bundle(Path(path), policy, allow_downgrade=True)
        manifest = verified.manifest
        toml_text = manifest.model_config or f'backend = "{manifest.backend}"\n'
        return toml_text, dict(verified.files)


def _require_key(key: bytes | None) -> bytes:
    if key is None:
        raise ValueError("a bundle needs the job's key (key=b'fleet:...' or b'x25519:...')")
    return key
