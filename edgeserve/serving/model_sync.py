"""Bring the registry in line with the model repository on disk: at start and on reload.

New versions load beside the serving ones, changed files are hot-swapped, versions
gone from disk are unloaded after their in-flight requests finish.
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
    for source in sources:
        registry.declare(source.name, source.config, source.versions)
    loop = asyncio.get_running_loop()
    for source in sources:
        for version in source.versions:
            if (source.name, version) in keep():
                continue
            files = await loop.run_in_executor(None, source.read_files, version)
            await registry.load(source.name, version, source.config, files)
    wanted = {(s.name, v) for s in sources for v in s.versions} | keep()
    for name in registry.names():
        for version in registry.statuses(name):
            if (name, version) not in wanted:
                log.info("unloading model=%s version=%s reason=gone from repository", name, version)
                await registry.unload(name, version)
