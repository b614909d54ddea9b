"""Async batch jobs on the server: SQLite-persisted, resumed after restart, run at low
priority beside live traffic. `store` (jobs.db), `runner` (the job thread), `routes`
(the /api/jobs endpoints)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeserve.config.loader import Settings
    from edgeserve.jobs.runner import JobRunner
    from edgeserve.serving.registry import Registry


def start_jobs(settings: Settings, registry: Registry) -> JobRunner | None:
    """The started job runner, or None when jobs are off or pyarrow is not installed."""
    if not settings.jobs.enabled:
        return None
    try:
        import pyarrow  # noqa: F401 - the file formats need it
    except ImportError:
        logging.getLogger(__name__).warning("jobs disabled: pip install 'edgeserve[batch]'")
        return None
    from edgeserve.jobs.admission import DiskBounds, JobAdmission, JobSlots, UploadBudget
    from edgeserve.jobs.pacing import LivePacer, LiveSignals
    from edgeserve.jobs.runner import JobRunner
    from edgeserve.jobs.store import JobStore

    state_dir = settings.server.state_dir
    jobs = settings.jobs
    store = JobStore(state_dir / "jobs.db")
    admission = JobAdmission(
        JobSlots(store.count_active, jobs.max_active_jobs),
        UploadBudget(
            state_dir / "jobs",
            DiskBounds(jobs.max_subject_bytes, jobs.max_total_bytes, jobs.min_free_bytes),
        ),
    )
    runner = JobRunner(
        store,
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
        served_model=lambda name, version: _served_model(settings, registry, name, version),
        feature_db=settings.features.resolve(state_dir),
        admission=admission,
    )
    runner.start()
    return runner


def _served_model(settings: Settings, registry: Registry, name: str, version: int) -> tuple:
    """(runtime, config) for a version that is not in the repository: its own copy from
    the installed slot when that is the version (so a hot swap cannot close it under
    the job), else the registry's loaded runtime."""
    loaded = registry.get(name, str(version))  # LOADING -> ModelNotReady: retried later
    try:
        from edgeserve.runtime import ThreadPlan, create_runtime
        from edgeserve.updates.keyring import open_store
        from edgeserve.updates.service import serving_config

        manifest, files = open_store(settings).load_current(name)
        if manifest.version == version:
            config = serving_config(manifest)
            backend = config.backend if config.backend != "auto" else settings.models.backend
            return create_runtime(backend, files, ThreadPlan(1, 1), name), config
    except Exception as exc:  # no store, no key: the registry's runtime still works
        logging.getLogger(__name__).info(
            "job uses the served runtime model=%s reason=%r", name, str(exc)[:200]
        )
    return loaded.runtime, loaded.config


def _served(registry: Registry) -> int:
    """Live requests answered so far, summed over loaded versions."""
    return sum(
        v.stats.success.count + v.stats.fail.count
        for name in registry.names()
        for v in registry.loaded(name).values()
    )
