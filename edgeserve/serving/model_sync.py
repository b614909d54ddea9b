"""Bring the registry in line with the model repository on disk: at start, on reload,
and for one model on an explicit load (edgeserve/serving/model_control.py).

New versions load beside the serving ones, changed files are hot-swapped, versions
gone from disk are unloaded after their in-flight requests finish. A model unloaded on
request stays unloaded through a reload until it is loaded on request again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from edgeserve.serving.registry import Registry
from edgeserve.serving.repository import ModelSource

log = logging.getLogger(__name__)


def _nothing() -> set[tuple[str, int]]:
    return set()


async def sync_repository(
    registry: Registry,
    sources: list[ModelSource],
    keep: Callable[[], set[tuple[str, int]]] = _nothing,
) -> None:
    """Declare, load (or keep) every version in `sources`; unload what is not there.

    `keep()` names (model, version) pairs served from elsewhere (installed bundles):
    they are neither loaded from the repository nor unloaded.
    """
    sources = [s for s in sources if not registry.unloaded(s.name)]
    for source in sources:
        registry.declare(source.name, source.config, source.versions)
    for source in sources:
        await _load_versions(registry, source, keep)
    wanted = {(s.name, v) for s in sources for v in s.versions} | keep()
    for name in registry.names():
        if registry.unloaded(name):
            continue
        await _unload_gone(registry, name, wanted)


async def sync_model(
    registry: Registry,
    source: ModelSource,
    keep: Callable[[], set[tuple[str, int]]] = _nothing,
) -> list[int]:
    """The same for one model: load its versions on disk, unload its versions gone.
    Returns the versions that failed to load (the registry logged why)."""
    registry.declare(source.name, source.config, source.versions)
    failed = await _load_versions(registry, source, keep)
    wanted = {(source.name, v) for v in source.versions} | keep()
    await _unload_gone(registry, source.name, wanted)
    return failed


async def _load_versions(
    registry: Registry, source: ModelSource, keep: Callable[[], set[tuple[str, int]]]
) -> list[int]:
    loop = asyncio.get_running_loop()
    failed = []
    for version in source.versions:
        if (source.name, version) in keep():
            continue
        files = await loop.run_in_executor(None, source.read_files, version)
        loaded = await registry.load(
            source.name, version, source.config, files, derive=source.derived
        )
        if loaded is None:
            failed.append(version)
    return failed


async def _unload_gone(registry: Registry, name: str, wanted: set[tuple[str, int]]) -> None:
    for version in registry.statuses(name):
        if (name, version) not in wanted:
            log.info("unloading model=%s version=%s reason=gone from repository", name, version)
            await registry.unload(name, version)
