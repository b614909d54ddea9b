"""The server's update manager: the dual-slot store wired to the registry.

Rule for a model that is both installed (slot store) and in the plain `models/`
repository: the installed version is the model's default version; the repository's
versions stay loaded and can be named explicitly, except a repository version with
the same number as the installed one, which the installed one shadows.

Swap on install or rollback: the new version is loaded and warmed beside the old
one, requests without a version switch to it, and the old installed version is
closed once its in-flight requests finished. Requests that already picked the old
version finish on it; none fails because of the swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edgeserve.config.loader import Settings
from edgeserve.runtime import ThreadPlan
from edgeserve.serving.registry import Registry
from edgeserve.serving.repository import ModelConfig
from edgeserve.updates.poller import BundlePoller
from edgeserve.updates.validation import bundle_config, make_validator
from edgeserve.updates.watch import Probation, baseline_row_ms
from updater import (
    BundleRejected,
    HealthPolicy,
    HealthWatch,
    InstallResult,
    Journal,
    Manifest,
    SlotStore,
    StoreError,
    run_samples,
)

log = logging.getLogger(__name__)

Audit = Callable[[str, str, str, str, dict], None]


@dataclass(frozen=True)
class Installed:
    """One installed model read at start-up: what to load, before loading it."""

    name: str
    manifest: Manifest
    files: Mapping[str, bytes]
    on_probation: bool


def serving_config(manifest: Manifest) -> ModelConfig:
    """The bundle's model.toml without default_version: the installed version is the default."""
    return replace(bundle_config(manifest), default_version=None)


class UpdateManager:
    """Installs, swaps, watches and rolls back installed model versions in a live server."""

    def __init__(
        self,
        settings: Settings,
        store: SlotStore,
        store_factory: Callable[[], SlotStore],
        threads: ThreadPlan,
        audit: Audit | None = None,
    ) -> None:
        u = settings.updater
        self.settings = settings
        self.store = store
        self._store_factory = store_factory  # re-reads keys: picks up a master key rotation
        self.policy = HealthPolicy(
            u.watch_window_s,
            u.min_requests,
            u.max_error_rate,
            u.max_p99_ms,
            u.min_subjects,
            u.max_slowdown,
        )
        self._validate = make_validator(settings.models.backend, threads)
        self._audit = audit
        self._registry: Registry | None = None
        self._lock = asyncio.Lock()
        self.serving: dict[str, int] = {}  # model -> installed version being served
        self.probations: dict[str, Probation] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.poller: BundlePoller | None = None
        self.on_rollback: Callable[[str, str], Awaitable[None]] | None = None
        self.tick_s = min(1.0, max(0.05, u.watch_window_s / 50))
        self.probe_interval_s = max(self.tick_s, u.watch_window_s / 10)

    # -- start and stop -------------------------------------------------------------------

    def pinned(self) -> set[tuple[str, int]]:
        """Versions the repository sync must neither load nor unload: they are ours."""
        return set(self.serving.items())

    def boot(self) -> list[Installed]:
        """Count this start for every model on probation, then decrypt what each serves.

        Runs in a thread before loading: a version that crashes the process at load is
        never confirmed, so its boot counter climbs until the store rolls it back.
        """
        found = []
        for name in self.store.model_names():
            try:
                journal = self.store.record_boot(name)
                if journal.active is None:
                    continue
                manifest, files = self.store.load_current(name)
            except Exception as exc:
                log.error("installed model not loaded model=%s error=%r", name, str(exc))
                self._record("atrest.decrypt", name, "failed", {"error": str(exc)[:200]})
                continue
            found.append(Installed(name, manifest, files, journal.probation is not None))
        return found

    def declare(self, registry: Registry, installed: list[Installed]) -> None:
        """Announce installed versions (LOADING until warm) and make them the defaults."""
        self._registry = registry
        for item in installed:
            registry.declare(item.name, serving_config(item.manifest), [item.manifest.version])
            registry.set_default_version(item.name, item.manifest.version)
            self.serving[item.name] = item.manifest.version

    async def load(self, installed: list[Installed]) -> None:
        """Load the installed versions; those on probation are watched from now."""
        for item in installed:
            await self._load(item.name, item.manifest, item.files)
            if item.on_probation:
                self._watch(item.name, item.manifest)

    def start(self) -> None:
        """The health watch ticker, and the index poller when [updater] poll_url is set."""
        self._tasks.append(asyncio.create_task(self._tick_forever()))
        u = self.settings.updater
        if u.poll_url:
            self.poller = BundlePoller(
                u.poll_url,
                u.poll_interval_s,
                self.settings.server.state_dir / "incoming",
                u.max_bundle_bytes,
                models=lambda: sorted(set(self.registry.names()) | set(self.serving)),
                versions_seen=self._versions_seen,
                install=self._install_polled,
            )
            self._tasks.append(asyncio.create_task(self.poller.run_forever()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _versions_seen(self, name: str) -> int:
        if name not in self.store.model_names():
            return 0
        return self.store.state(name).versions_seen

    async def _install_polled(self, bundle: Path, model: str, reason: str) -> None:
        try:
            result = await self.install(bundle, model=model, reason=reason)
        except Exception as exc:
            self._record("update.install", model, "rejected", {"error": str(exc), "by": "poll"})
            raise
        self._record("update.install", model, "ok", {"version": result.version, "by": "poll"})

    def busy(self, name: str) -> bool:
        """An install or rollback is running (one at a time: they swap the registry)."""
        return self._lock.locked()

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise RuntimeError("the update manager is not started")
        return self._registry

    # -- install, rollback, pick up changes made by the CLI -------------------------------

    async def install(
        self,
        bundle: Path,
        *,
        model: str | None = None,
        allow_downgrade: bool = False,
        reason: str = "",
    ) -> InstallResult:
        """Verify, validate in the real runtime, flip, then hot-swap and start the watch.

        BundleRejected leaves the store and what serves untouched.
        """
        async with self._lock:
            seen: dict[str, Any] = {}

            def validate(files: Mapping[str, bytes], manifest: Manifest) -> None:
                self._validate(files, manifest)
                seen["files"], seen["manifest"] = files, manifest

            self._refresh_keys()
            result = await asyncio.to_thread(
                self.store.install,
                bundle,
                validate=validate,
                model=model,
                allow_downgrade=allow_downgrade,
                reason=reason,
            )
            manifest: Manifest = seen["manifest"]
            # the version being replaced, measured before it is unloaded: the new one is
            # judged against its compute per row
            baseline = self._baseline(result.model)
            if not await self._swap(result.model, manifest, seen["files"]):
                # Validated, yet the server could not load it: do not leave it active.
                why = f"version {manifest.version} failed to load in the server"
                with contextlib.suppress(StoreError):
                    await asyncio.to_thread(self.store.rollback, result.model, why)
                raise BundleRejected("validation_failed", f"{why}; the store was rolled back")
            self._watch(result.model, manifest, baseline)
            return result

    async def rollback(self, name: str, reason: str) -> Journal:
        """Flip back to the previous slot and serve it (health verdict or by hand)."""
        async with self._lock:
            self._refresh_keys()
            journal = await asyncio.to_thread(self.store.rollback, name, reason)
            await self._serve_current(name)
        if self.on_rollback is not None:
            await self.on_rollback(name, reason)  # an alert and a metric, via telemetry
        return journal

    async def confirm(self, name: str) -> Journal:
        async with self._lock:
            journal = await asyncio.to_thread(self.store.confirm, name)
            self._unwatch(name)
            return journal

    async def sync_from_store(self) -> None:
        """Serve what the store says (after `edgeserve update apply/rollback` and SIGHUP)."""
        async with self._lock:
            self._refresh_keys()
            for name in await asyncio.to_thread(self.store.model_names):
                journal = await asyncio.to_thread(self.store.state, name)
                if journal.active_version is None:
                    continue
                if journal.active_version != self.serving.get(name):
                    manifest = await self._serve_current(name)
                    if journal.probation is not None and manifest is not None:
                        self._watch(name, manifest)
                elif journal.probation is None:
                    self._unwatch(name)

    def status(self, name: str) -> dict[str, Any]:
        """Slots, versions, verdict, history and the live watch of one installed model."""
        try:
            journal = self.store.state(name)
        except StoreError:
            journal = Journal(model=name)
        doc = journal.to_json()
        doc.pop("format", None)
        doc["active_version"] = journal.active_version
        doc["previous_version"] = journal.previous_version
        doc["serving_version"] = self.serving.get(name)
        probation = self.probations.get(name)
        doc["watch"] = probation.summary(time.monotonic()) if probation else None
        return doc

    # -- internals ------------------------------------------------------------------------

    def _refresh_keys(self) -> None:
        """Pick up a master key rotated by `edgeserve keys rotate` while we run."""
        try:
            self.store = self._store_factory()
        except Exception as exc:
            log.error("keeping the loaded master keys error=%r", str(exc))

    async def _load(self, name: str, manifest: Manifest, files: Mapping[str, bytes]) -> bool:
        loaded = await self.registry.load(name, manifest.version, serving_config(manifest), files)
        return loaded is not None

    async def _swap(self, name: str, manifest: Manifest, files: Mapping[str, bytes]) -> None:
        """Load and warm beside the old version, switch the default, retire the old one."""
        old = self.serving.get(name)
        if not await self._load(name, manifest, files):
            log.error(
                "installed version failed to load model=%s version=%s", name, manifest.version
            )
            return
        self.registry.set_default_version(name, manifest.version)
        self.serving[name] = manifest.version
        self._unwatch(name)
        if old is not None and old != manifest.version:
            await self.registry.unload(name, old)  # returns once its in-flight requests finished
        log.info("swapped model=%s from=%s to=%s", name, old, manifest.version)
        return True

    async def _serve_current(self, name: str) -> Manifest | None:
        try:
            manifest, files = await asyncio.to_thread(self.store.load_current, name)
        except Exception as exc:
            log.error("cannot read the installed version model=%s error=%r", name, str(exc))
            return None
        await self._swap(name, manifest, files)
        return manifest

    def _baseline(self, name: str) -> float | None:
        serving = self.serving.get(name)
        if serving is None:
            return None
        return baseline_row_ms(self.registry.loaded(name).get(serving))

    def _watch(self, name: str, manifest: Manifest, baseline: float | None = None) -> None:
        model = self.registry.loaded(name).get(manifest.version)
        if model is None:
            return
        self._unwatch(name)
        now = time.monotonic()
        watch = HealthWatch(self.policy, now, baseline_row_ms=baseline)
        probation = Probation(manifest.version, manifest, watch, model, now + self.tick_s)
        probation.attach()
        self.probations[name] = probation
        log.info(
            "health watch started model=%s version=%s window_s=%s",
            name,
            manifest.version,
            self.policy.watch_window_s,
        )

    def _unwatch(self, name: str) -> None:
        probation = self.probations.pop(name, None)
        if probation is not None:
            probation.detach()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            for name, probation in list(self.probations.items()):
                try:
                    await self._judge(name, probation)
                except Exception:
                    log.exception("health watch failed model=%s", name)

    async def _judge(self, name: str, probation: Probation) -> None:
        now = time.monotonic()
        if probation.manifest.samples and now >= probation.next_probe_s:
            probation.next_probe_s = now + self.probe_interval_s
            await self._probe(probation)
        verdict = probation.watch.verdict(time.monotonic())
        if self.probations.get(name) is not probation or verdict.action == "wait":
            return
        if verdict.action == "confirm":
            await self.confirm(name)
            log.info("confirmed model=%s version=%s %s", name, probation.version, verdict.reason)
            self._record("update.confirm", name, "ok", {"version": probation.version})
            return
        log.warning("health watch rollback model=%s reason=%r", name, verdict.reason)
        try:
            await self.rollback(name, f"health watch: {verdict.reason}")
        except StoreError as exc:  # first install, nothing to go back to
            log.error("cannot roll back model=%s error=%r", name, exc.message)
            self._unwatch(name)
            return
        self._record("update.rollback", name, "ok", {"reason": verdict.reason, "by": "health"})

    async def _probe(self, probation: Probation) -> None:
        """Re-run the manifest's samples on the loaded version (the live validation probe)."""
        runtime = probation.model.runtime
        try:
            await asyncio.to_thread(
                run_samples, probation.manifest, lambda feeds: runtime.run(feeds, None)
            )
        except Exception as exc:
            probation.watch.probe_failed(str(exc) or type(exc).__name__)

    def _record(self, action: str, target: str, outcome: str, detail: dict) -> None:
        if self._audit is not None:
            self._audit(action, target, outcome, "edgeserve", detail)
