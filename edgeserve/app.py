"""Build the ASGI application and its lifespan: executor, registry, model loading.

Models load in the background after start-up, so `/v2/health/live` answers at once
and `/v2/health/ready` turns 200 when every model is warm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import orjson
import psutil
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from edgeserve.audit.log import AuditLog
from edgeserve.audit.log import check_key as check_audit_key
from edgeserve.audit.routes import ROUTES as AUDIT_ROUTES
from edgeserve.audit.routes import AuditMiddleware
from edgeserve.auth.guard import build_authenticator
from edgeserve.config.loader import ConfigError, Settings, load_settings
from edgeserve.dashboard.routes import ROUTES as DASHBOARD_ROUTES
from edgeserve.experiments.routes import ROUTES as EXPERIMENT_ROUTES
from edgeserve.experiments.service import ExperimentService
from edgeserve.http.dispatch import EdgeserveApp
from edgeserve.http.errors import EXCEPTION_HANDLERS
from edgeserve.http.headers import HeaderGuard
from edgeserve.http.routes import ROUTES as V2_ROUTES
from edgeserve.http.shedding import ShedMiddleware
from edgeserve.http.slashes import relative_slash_redirects
from edgeserve.http.streaming import ROUTES as STREAM_ROUTES
from edgeserve.jobs import start_jobs
from edgeserve.jobs.routes import ROUTES as JOB_ROUTES
from edgeserve.process import systemd_notify
from edgeserve.process.gc_pauses import HeapSettler
from edgeserve.protocol.limits import DecodeLimits
from edgeserve.runtime import ThreadPlan
from edgeserve.serving.admission import LoopLagMonitor
from edgeserve.serving.model_sync import sync_repository
from edgeserve.serving.pipeline import UNKNOWN_MODEL_COUNTER, DataPlane
from edgeserve.serving.registry import Registry
from edgeserve.serving.repository import scan_repository
from edgeserve.telemetry.metrics import ReadCounter
from edgeserve.telemetry.routes import ROUTES as TELEMETRY_ROUTES
from edgeserve.telemetry.service import Telemetry
from edgeserve.updates.recovery import recover_box
from edgeserve.updates.routes import ROUTES as UPDATE_ROUTES
from edgeserve.updates.service import Audit, UpdateManager
from edgeserve.updates.startup import build_update_manager

log = logging.getLogger(__name__)


def plan_threads(settings: Settings) -> tuple[int, ThreadPlan]:
    """Executor size and per-call runtime threads, so that together they fill the cores
    without oversubscribing them."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    executor = settings.server.executor_threads or cores
    intra = settings.models.intra_op_threads or max(1, cores // executor)
    return executor, ThreadPlan(
        intra_op=intra,
        inter_op=settings.models.inter_op_threads,
        precision=settings.models.openvino_precision,
    )


def build_app(settings: Settings) -> Starlette:
    """The whole edgeserve application for `settings`; nothing runs until its lifespan."""
    recover_box(settings)  # before anything reads keys or the store (idempotent)
    check_audit_key(settings.server.state_dir)  # a short key is refused before serving

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        workers, threads = plan_threads(settings)
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")
        registry = Registry(
            executor, workers, threads, settings.models.backend, warmup=settings.models.warmup
        )
        app.state.registry = registry
        settler = HeapSettler()
        registry.on_change = settler.changed
        loop_lag = LoopLagMonitor(settings.server.loop_lag_target_ms / 1000)
        loop_lag.start()
        app.state.loop_gate = loop_lag  # http/shedding.py refuses what it does not admit
        telemetry = _start_telemetry(app, settings, registry)
        if telemetry is not None:
            await telemetry.start()
        audit = _start_audit(app, settings, telemetry)
        for source in sources:
            registry.declare(source.name, source.config, source.versions)
        log.info(
            "starting models=%d executor_threads=%d intra_op_threads=%d",
            len(sources),
            workers,
            threads.intra_op,
        )
        updates: UpdateManager | None = app.state.updates
        installed = await asyncio.to_thread(updates.boot) if updates is not None else []
        if updates is not None:
            updates.declare(registry, installed)  # installed versions are the defaults
            if telemetry is not None:
                updates.on_rollback = telemetry.note_rollback
                telemetry.expect_rollbacks([source.name for source in sources])
            updates.start()
        loading = asyncio.create_task(_load_models(registry, sources, updates, installed))
        app.state.loading = loading  # server.py tells systemd READY=1 once it is done
        app.state.reload = lambda: _reload(app, registry)
        experiments = _start_experiments(app, settings, registry)
        app.state.jobs = start_jobs(settings, registry)
        grpc_server = None
        if settings.server.grpc_port:
            from edgeserve.grpc.service import start_grpc_server  # the grpc extra

            grpc_server, app.state.grpc_port = await start_grpc_server(app, settings)
        try:
            yield
        finally:
            systemd_notify.stopping()
            if grpc_server is not None:
                await grpc_server.stop(settings.server.graceful_timeout_s)
            if app.state.jobs is not None:
                await asyncio.to_thread(app.state.jobs.stop)
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            if updates is not None:
                await updates.stop()
            await registry.close()
            settler.stop()
            loop_lag.stop()
            executor.shutdown(wait=True, cancel_futures=True)
            if experiments is not None:
                await experiments.stop()
            await asyncio.to_thread(audit.stop)  # after everything that records
            if telemetry is not None:
                await telemetry.stop()

    sources = scan_repository(settings.models.repository, settings.models.load or None)
    middleware = [
        Middleware(AuditMiddleware),
        Middleware(
            HeaderGuard,
            max_headers=settings.limits.max_headers,
            max_header_bytes=settings.limits.max_header_bytes,
        ),
    ]
    if settings.server.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.server.cors_origins,
                allow_methods=["GET", "POST"],
                allow_headers=[
                    "authorization",
                    "content-type",
                    "inference-header-content-length",
                    "x-request-timeout-ms",
                ],
            )
        )
    middleware.append(Middleware(ShedMiddleware))  # innermost: cheap 429s keep CORS headers
    app = EdgeserveApp(
        routes=[
            *V2_ROUTES,
            *TELEMETRY_ROUTES,
            *EXPERIMENT_ROUTES,
            *DASHBOARD_ROUTES,
            *JOB_ROUTES,
            *STREAM_ROUTES,
            *UPDATE_ROUTES,
            *AUDIT_ROUTES,
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
        middleware=middleware,
        max_headers=settings.limits.max_headers,
        max_header_bytes=settings.limits.max_header_bytes,
        direct_infer=not settings.server.cors_origins,
    )
    relative_slash_redirects(app.router)  # never a URL built from the Host header
    app.state.settings = settings
    app.state.decode_limits = DecodeLimits.from_settings(settings.limits)
    app.state.subject_header = settings.telemetry.subject_header
    app.state.recorder = None
    app.state.loop_gate = None  # set by the lifespan (edgeserve/serving/admission.py)
    app.state.telemetry = None
    app.state.experiments = None
    app.state.audit = None
    app.state.pipeline = DataPlane(app.state)
    app.state.authenticator = build_authenticator(
        settings.auth, settings.server.state_dir, settings.server.host
    )
    app.state.updates = build_update_manager(settings, plan_threads(settings)[1], _audit_hook(app))
    return app


def _audit_hook(app: Starlette) -> Audit:
    def audit(action: str, target: str, outcome: str, subject: str, detail: dict) -> None:
        log_ = getattr(app.state, "audit", None)
        if log_ is not None:
            log_.record(action, target, outcome, subject=subject, detail=detail)

    return audit


def _start_audit(app: Starlette, settings: Settings, telemetry: Telemetry | None) -> AuditLog:
    """The audit log (`app.state.audit`), fed 401s by the authenticator; with an upstream
    collector configured, each row is also shipped through telemetry as an off-box copy."""
    forward = None
    if telemetry is not None and settings.telemetry.upstream.url:

        def forward(rows: list[dict]) -> None:
            for row in rows:
                detail = {
                    **orjson.loads(row["detail"]),
                    "client": row["client"],
                    "audit_seq": row["seq"],
                    "audit_hash": row["hash"],
                }
                telemetry.record_audit(
                    row["action"], row["target"], row["outcome"], row["subject"], detail
                )

    audit = AuditLog(settings.audit, settings.server.state_dir, forward)
    audit.start()
    app.state.audit = audit
    if hasattr(app.state.authenticator, "on_refused"):
        app.state.authenticator.on_refused = audit.record_refused
    return audit


async def _load_models(
    registry: Registry, sources: list, updates: UpdateManager | None, installed: list
) -> None:
    """Installed versions first (they are the defaults), then the plain repository."""
    if updates is not None:
        await updates.load(installed)
    async with registry.changing:  # not beside an explicit load or unload
        await sync_repository(registry, sources, updates.pinned if updates else lambda: set())


def _alert_path(app: Starlette) -> Callable[[str, str, float, str], Awaitable[None]]:
    """Telemetry's alert path (stored, exported, webhook) for alerts raised elsewhere."""

    async def alert(rule: str, state: str, value: float, message: str) -> None:
        telemetry = getattr(app.state, "telemetry", None)
        if telemetry is not None:
            await telemetry.raise_alert(rule, state, value, message)

    return alert


def _start_experiments(
    app: Starlette, settings: Settings, registry: Registry
) -> ExperimentService | None:
    """Experiments from saved state and the config, routing on the request path."""
    if not settings.experiments.enabled:
        return None
    updates: UpdateManager | None = app.state.updates

    def audit(action: str, target: str, outcome: str, subject: str, detail: dict) -> None:
        log_ = getattr(app.state, "audit", None)
        if log_ is not None:
            log_.record(action, target, outcome, subject=subject, detail=detail)

    service = ExperimentService(
        settings.experiments,
        settings.server.state_dir,
        known_models=lambda: {n: sorted(registry.statuses(n)) for n in registry.names()},
        serving=lambda: {n: sorted(registry.loaded(n)) for n in registry.names()},
        promote=registry.set_default_version,
        audit=audit,
        installed=lambda model: updates is not None and model in updates.serving,
        alert=_alert_path(app),
    )
    service.load()
    service.start()
    app.state.experiments = service
    return service


def _start_telemetry(app: Starlette, settings: Settings, registry: Registry) -> Telemetry | None:
    """The telemetry subsystem, wired to the registry's gauges; None when switched off."""
    if not settings.telemetry.enabled:
        return None

    def queue_fill() -> float:
        capacity = sum(
            v.config.batching.max_queue_size
            for name in registry.names()
            for v in registry.loaded(name).values()
        )
        return registry.queue_depth() / capacity if capacity else 0.0

    telemetry = Telemetry(settings.telemetry, settings.server.state_dir, queue_fill)
    telemetry.metrics.gauge(
        "edgeserve_queue_depth", "Requests queued or running", registry.queue_depth
    )
    telemetry.metrics.register(
        ReadCounter(
            "edgeserve_requests_shed",
            "Inference requests refused with 429 because the model's queue was full, "
            "answered before routing, auth and the body read (they leave no telemetry record)",
            ["model"],
            registry.shed_counts,
        )
    )
    telemetry.metrics.register(
        ReadCounter(
            UNKNOWN_MODEL_COUNTER,
            "Inference requests naming a model or version that does not exist (one "
            "unlabelled series: the names are the client's text, never labels or rows)",
            [],
            app.state.pipeline.unknown_counts,
        )
    )
    bounds = getattr(app.state, "bounds", None)  # set by edgeserve/server.py
    if bounds is not None:
        telemetry.metrics.register(
            ReadCounter(
                "edgeserve_bounds_hit",
                "Connections and request bodies refused by a bound (connection caps: 503 "
                "and close; body deadline: 408 and close)",
                ["bound"],
                bounds.counts,
            )
        )
    token_cache = getattr(app.state.authenticator, "cache", None)
    if token_cache is not None:
        telemetry.metrics.register(
            ReadCounter(
                "edgeserve_auth_token_cache_lookups",
                "Verified-token cache lookups by result (a hit skips the signature check)",
                ["result"],
                token_cache.lookups,
            )
        )
    telemetry.metrics.gauge(
        "edgeserve_models_loaded",
        "Model versions loaded and ready",
        lambda: sum(len(registry.loaded(n)) for n in registry.names()),
    )
    app.state.telemetry = telemetry
    app.state.recorder = telemetry
    return telemetry


async def _reload(app: Starlette, registry: Registry) -> None:
    """Re-read the config's [models] section and the repository; keep serving meanwhile.

    Only the model repository is reloaded; other changed sections are logged as needing
    a restart. A broken config or model leaves what is serving untouched.
    """
    settings: Settings = app.state.settings
    try:
        fresh = load_settings(settings.source) if settings.source else settings
        sources = scan_repository(fresh.models.repository, fresh.models.load or None)
    except ConfigError as exc:
        log.error("reload refused error=%r", str(exc))
        return
    for section in ("server", "limits", "auth", "telemetry", "updater", "experiments", "jobs"):
        if getattr(fresh, section) != getattr(settings, section):
            log.warning("reload section=%s changed; restart to apply it", section)
    log.info("reloading models=%d", len(sources))
    updates: UpdateManager | None = app.state.updates
    async with registry.changing:  # not beside an explicit load or unload
        await sync_repository(registry, sources, updates.pinned if updates else lambda: set())
    if updates is not None:
        await updates.sync_from_store()  # after `edgeserve update apply|rollback`
    log.info("reload done")
