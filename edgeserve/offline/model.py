"""Load a model for offline scoring: from a model folder, or from the installed slot.

No server is involved: the same `create_runtime` as the server, with the runtime's
threads sized to the whole box since nothing else is competing for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeserve.errors import InvalidInput, ModelNotFound
from edgeserve.protocol.integers import parse_uint
from edgeserve.runtime import Runtime, ThreadPlan, create_runtime
from edgeserve.serving.repository import ModelConfig, read_model

# Where an installed model comes from: name -> (version, config, files decrypted in memory).
SlotLoader = Callable[[str], tuple[int, ModelConfig, dict[str, bytes]]]


@dataclass
class LoadedModel:
    name: str
    version: int
    config: ModelConfig
    runtime: Runtime


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`NAME` or `NAME:VERSION`."""
    name, sep, version = ref.partition(":")
    number = parse_uint(version)
    if not name or (sep and number is None):
        raise InvalidInput(f"--model {ref!r}: expected NAME or NAME:VERSION")
    return name, number


def load_model(
    repository: Path,
    ref: str,
    backend: str = "auto",
    threads: ThreadPlan | None = None,
    slot_loader: SlotLoader | None = None,
) -> LoadedModel:
    """The model `ref` from `repository`, or the installed version from `slot_loader`."""
    name, version = parse_ref(ref)
    if slot_loader is not None:
        installed, config, files = slot_loader(name)
        if version is not None and version != installed:
            raise ModelNotFound(f"model '{name}' has version {installed} installed, not {version}")
        version = installed
    else:
        folder = repository / name
        if not (folder / "model.toml").is_file():
            raise ModelNotFound(f"no model '{name}' in {repository}")
        source = read_model(folder)
        config = source.config
        if version is None:
            version = config.default_version or max(source.versions)
        if version not in source.versions:
            raise ModelNotFound(f"model '{name}' has no version {version} in {repository}")
        files = source.read_files(version)
    chosen = config.backend if config.backend != "auto" else backend
    plan = threads or ThreadPlan(intra_op=os.cpu_count() or 1, inter_op=1)
    runtime = create_runtime(chosen, files, plan, model=name)
    return LoadedModel(name, version, config, runtime)


def installed_slot_loader(config_path: Path | None) -> SlotLoader:
    """Read installed (encrypted) slots with the keys the server's config names."""
    from edgeserve.config.loader import find_config, load_settings
    from edgeserve.updates.keyring import open_store
    from edgeserve.updates.service import serving_config

    store = open_store(load_settings(find_config(config_path).path))

    def load(name: str) -> tuple[int, ModelConfig, dict[str, bytes]]:
        manifest, files = store.load_current(name)
        return manifest.version, serving_config(manifest), files

    return load
