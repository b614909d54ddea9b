"""Load a model for offline scoring: from a model folder, or (later) an installed slot.

No server is involved: the same `create_runtime` as the server, with the runtime's
threads sized to the whole box since nothing else is competing for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeserve.errors import InvalidInput, ModelNotFound
from edgeserve.repository import ModelConfig, read_model
from edgeserve.runtime import Runtime, ThreadPlan, create_runtime

# Seam for installed (encrypted) slots: given a model name, return (version, files)
# decrypted in memory, e.g. a wrapper around `updater`'s `load_current(...)`.
SlotLoader = Callable[[str], tuple[int, dict[str, bytes]]]


@dataclass
class LoadedModel:
    name: str
    version: int
    config: ModelConfig
    runtime: Runtime


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`NAME` or `NAME:VERSION`."""
    name, sep, version = ref.partition(":")
    if not name or (sep and not version.isdigit()):
        raise InvalidInput(f"--model {ref!r}: expected NAME or NAME:VERSION")
    return name, int(version) if sep else None


def load_model(
    repository: Path,
    ref: str,
    backend: str = "auto",
    threads: ThreadPlan | None = None,
    slot_loader: SlotLoader | None = None,
) -> LoadedModel:
    """The model `ref` from `repository` (or from `slot_loader` when given)."""
    name, version = parse_ref(ref)
    folder = repository / name
    if not (folder / "model.toml").is_file():
        raise ModelNotFound(f"no model '{name}' in {repository}")
    source = read_model(folder)
    if slot_loader is not None:
        version, files = slot_loader(name)
    else:
        if version is None:
            version = source.config.default_version or max(source.versions)
        if version not in source.versions:
            raise ModelNotFound(f"model '{name}' has no version {version} in {repository}")
        files = source.read_files(version)
    chosen = source.config.backend if source.config.backend != "auto" else backend
    plan = threads or ThreadPlan(intra_op=os.cpu_count() or 1, inter_op=1)
    runtime = create_runtime(chosen, files, plan, model=name)
    return LoadedModel(name, version, source.config, runtime)
