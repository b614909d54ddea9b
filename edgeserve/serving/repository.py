"""The model repository on disk: `<root>/<name>/model.toml` and `<root>/<name>/<version>/`.

The layout is the one Triton and OVMS users know. Reading a model gives its typed
config and, per version, the files as bytes (so a runtime never needs a plaintext path).
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgeserve.config.schema import ConfigError, parse_section, setting
from edgeserve.protocol.integers import parse_uint
from edgeserve.runtime.datatypes import V2_TO_NUMPY

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MODEL_FILES = ("model.onnx", "model.xml", "model.bin")
MAX_MODEL_FILE_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class TensorConfig:
    name: str
    datatype: str = setting(choices=tuple(V2_TO_NUMPY))
    shape: list[int] = setting([])

    def __post_init__(self) -> None:
        if any(d < -1 or d == 0 for d in self.shape):
            raise ConfigError("shape", f"dimensions must be -1 or >= 1, got {self.shape}")


@dataclass(frozen=True)
class BatchingConfig:
    """How concurrent requests for one model version are merged into batches."""

    max_queue_delay_ms: float = setting(1.0, min=0.0, max=1000.0)
    # Close a batch at this many rows (0 = max_batch_size). Past the size where the
    # runtime's rows/s stops rising, a bigger batch computes no faster; it only takes
    # queued requests away from the slot that frees up next, which then idles.
    preferred_batch_size: int = setting(0, min=0, max=4096)
    max_queue_size: int = setting(256, min=1, max=1_000_000)
    # Batches of this model running at once; 0 = one per executor thread.
    max_concurrent_batches: int = setting(0, min=0, max=256)
    # Wait max_queue_delay_ms for company even when the box is idle (adds latency at 1 client).
    wait_when_idle: bool = False
    # Refuse (429) when the queue's oldest request has waited this long or the estimated
    # wait is longer; a batch also holds at most the rows one slot computes in this time.
    max_queue_wait_ms: float = setting(250.0, min=0.0, max=600_000.0)  # 0 = no estimate
    # The same bound while the model is offered clearly more rows than it computes (an
    # overload, not a busy closed loop of clients): then a long queue only adds latency.
    # 0 = max_queue_wait_ms always.
    overload_queue_wait_ms: float = setting(0.0, min=0.0, max=600_000.0)


@dataclass(frozen=True)
class ThreadConfig:
    """Per-model override of [models] intra_op_threads, e.g. all cores for one big batch."""

    intra_op_threads: int = setting(0, min=0, max=256)  # 0 = the server's plan


@dataclass(frozen=True)
class CacheConfig:
    """Response cache: identical requests answered from memory (off by default)."""

    enabled: bool = False
    max_bytes: int = setting(64 * 1024 * 1024, min=1024)


@dataclass(frozen=True)
class WarmupConfig:
    batch_sizes: list[int] = setting([1])


@dataclass(frozen=True)
class FeatureConfig:
    """Inputs read from the online feature store by entity id (see edgeserve.serving.features)."""

    table: str = ""  # empty = every input comes from the request
    entity: str = "entity_id"  # request parameter / input / batch column with the id
    inputs: list[str] = setting([])  # model inputs filled from `table`
    map: dict[str, str] = setting({})  # input -> column or PREFIX*, as `batch score --map`


@dataclass(frozen=True)
class ModelConfig:
    """What `model.toml` says about one model."""

    description: str = ""
    backend: str = setting("auto", choices=("auto", "onnxruntime", "openvino"))
    max_batch_size: int = setting(0, min=0, max=4096)
    default_version: int | None = setting(None, min=1)
    labels: list[str] = setting([])
    inputs: list[TensorConfig] = setting([])
    outputs: list[TensorConfig] = setting([])
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    threads: ThreadConfig = field(default_factory=ThreadConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)


@dataclass(frozen=True)
class ModelSource:
    """One model in the repository: its config and the versions found on disk."""

    name: str
    config: ModelConfig
    versions: tuple[int, ...]
    root: Path
    derived: bool = False  # no model.toml: the registry completes the config from the model

    def read_files(self, version: int) -> dict[str, bytes]:
        """The version's model files as bytes."""
        folder = self.root / str(version)
        files: dict[str, bytes] = {}
        for name in MODEL_FILES:
            path = folder / name
            if path.is_file():
                if path.stat().st_size > MAX_MODEL_FILE_BYTES:
                    raise ConfigError(f"{self.name}/{version}/{name}", "file is too large")
                files[name] = path.read_bytes()
        return files


def parse_model_config(text: str, where: str) -> ModelConfig:
    """Parse model.toml text; errors name `where` and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(where, f"is not valid TOML: {exc}") from None
    config = parse_section(ModelConfig, data, where)
    names = [t.name for t in config.inputs]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.inputs", "input names must be unique")
    preferred = config.batching.preferred_batch_size
    if preferred > max(config.max_batch_size, 1):
        raise ConfigError(
            f"{where}.batching.preferred_batch_size",
            f"{preferred} is larger than max_batch_size ({config.max_batch_size})",
        )
    return config


def scan_repository(
    root: Path, only: list[str] | None = None, *, warn: bool = True
) -> list[ModelSource]:
    """Every model under `root` (or only those named), sorted by name; a folder that
    cannot be served is one WARNING (unless `warn` is off: a check before the real scan)."""
    if not root.is_dir():
        raise ConfigError("models.repository", f"{root} is not a folder")
    sources = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name.startswith(".") or (only and folder.name not in only):
            continue
        if (folder / "model.toml").is_file():
            sources.append(read_model(folder))
            continue
        try:
            sources.append(bare_model(folder))
        except ConfigError as exc:
            if warn:
                log.warning("model folder skipped folder=%s reason=%r", folder, exc.problem)
    missing = set(only or []) - {s.name for s in sources}
    if missing:
        raise ConfigError("models.load", f"no such model in {root}: {', '.join(sorted(missing))}")
    return sources


def read_source(folder: Path) -> ModelSource:
    """One model folder, with or without model.toml (for an explicit load)."""
    if (folder / "model.toml").is_file():
        return read_model(folder)
    return bare_model(folder)


def bare_model(folder: Path) -> ModelSource:
    """A folder without model.toml: served with a configuration derived from the model
    file at load (edgeserve/serving/autocomplete.py), as Triton's auto-complete does."""
    _check_name(folder)
    versions = _versions(folder)
    if not versions:
        raise ConfigError(
            str(folder), "no model.toml and no version folder (1/, 2/, ...) with a model file"
        )
    return ModelSource(folder.name, ModelConfig(), versions, folder, derived=True)


def read_model(folder: Path) -> ModelSource:
    """Read one model folder."""
    name = folder.name
    _check_name(folder)
    config = parse_model_config((folder / "model.toml").read_text("utf-8"), f"{name}/model.toml")
    versions = _versions(folder)
    if not versions:
        raise ConfigError(f"{name}", f"{folder} has no version folder with a model file")
    if config.default_version is not None and config.default_version not in versions:
        raise ConfigError(
            f"{name}/model.toml.default_version", f"version {config.default_version} is not on disk"
        )
    return ModelSource(name=name, config=config, versions=versions, root=folder)


def _check_name(folder: Path) -> None:
    if not MODEL_NAME.match(folder.name):
        raise ConfigError(str(folder), "model folder names use letters, digits, '_', '.', '-'")


def _versions(folder: Path) -> tuple[int, ...]:
    """The numbered version folders that hold a model file."""
    return tuple(
        sorted(
            number
            for p in folder.iterdir()
            if p.is_dir()
            and (number := parse_uint(p.name) or 0) > 0
            and any((p / f).is_file() for f in ("model.onnx", "model.xml"))
        )
    )
