"""Async batch jobs on the server: SQLite-persisted, resumed after restart, run at low
priority beside live traffic. `store` (jobs.db), `runner` (the job thread), `routes`
(the /api/jobs endpoints)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeserve.config import Settings
    from edgeserve.jobs.runner import JobRunner
    from edgeserve.registry import Registry


def start_jobs(settings: Settings, registry: Registry) -> JobRunner | None:
    """The started job runner, or None when jobs are off or pyarrow is not installed."""
    if not settings.jobs.enabled:
        return None
    try:
        import pyarrow  # noqa: F401 - the file formats need it
    except ImportError:
        import logging

        logging.getLogger(__name__).warning("jobs disabled: pip install 'edgeserve[batch]'")
        return None
    from edgeserve.jobs.pacing import LivePacer, LiveSignals
    from edgeserve.jobs.runner import JobRunner
    from edgeserve.jobs.store import JobStore

    state_dir = settings.server.state_dir
    runner = JobRunner(
        JobStore(state_dir / "jobs.db"),
        state_dir / "jobs",
        settings.models.repository,
        settings.models.backend,
        settings.jobs.chunk_rows,
        settings.jobs.checkpoint_interval_s,
        settings.jobs.nice,
        LivePacer(
            LiveSignals(registry.queue_depth, lambda: _served(registry)),
            settings.jobs.busy_share,
            settings.jobs.idle_poll_ms / 1000.0,
        ),
        keep_finished_s=settings.jobs.keep_finished_s,
        served_model=lambda name, version: _served_model(registry, name, version),
        feature_db=settings.features.resolve(state_dir),
    )
    runner.start()
    return runner


def _served_model(registry: Registry, name: str, version: int) -> tuple:
    """The registry's loaded version (runtime, config): for installed versions, which
    exist only decrypted in the server's memory."""
    loaded = registry.get(name, str(version))
    return loaded.runtime, loaded.config


def _served(registry: Registry) -> int:
    """Live requests answered so far, summed over loaded versions."""
    return sum(
        v.stats.success.count + v.stats.fail.count
        for name in registry.names()
        for v in registry.loaded(name).values()
    )
