"""The telemetry subsystem as the server sees it: record, export, sync, keep in bounds.

`record_inference` is the only call on the request path: a metrics update and a
non-blocking queue put. Everything else runs on the writer thread or in background
tasks started by `start()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from edgeserve.telemetry import maintenance
from edgeserve.telemetry.alerts import AlertChange, AlertRules
from edgeserve.telemetry.metrics import Metrics
from edgeserve.telemetry.records import EventRecord, FeedbackRecord, InferenceRecord
from edgeserve.telemetry.settings import TelemetrySettings
from edgeserve.telemetry.store import TelemetryStore
from edgeserve.telemetry.sync import UpstreamSync

log = logging.getLogger(__name__)


class Telemetry:
    """Owns the store, metrics, sync and maintenance of one server process."""

    def __init__(
        self,
        settings: TelemetrySettings,
        state_dir: Path,
        queue_fill: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store = TelemetryStore(
            state_dir / "telemetry.db",
            settings.data_region,
            settings.queue_records,
            settings.write_batch_records,
            settings.write_interval_ms / 1000.0,
            on_drop=lambda table, reason, n: self.metrics.dropped.labels(table, reason).inc(n),
        )
        self._subject_key = _subject_key(state_dir / "keys" / "subject.key")
        self.sync = (
            UpstreamSync(self.store, settings.upstream, secrets.token_hex(8))
            if settings.upstream.url
            else None
        )
        self.alerts = AlertRules(
            settings.alerts, queue_fill, lambda: self.sync.lag_s if self.sync else 0.0
        )
        self.metrics.gauge(
            "edgeserve_telemetry_backlog_records",
            "Records queued in memory, not yet written",
            self.store.backlog_in_memory,
        )
        self.metrics.gauge(
            "edgeserve_sync_lag_seconds",
            "Age of the oldest unsynced record",
            lambda: self.sync.lag_s if self.sync else 0.0,
        )
        self._tasks: list[asyncio.Task] = []

    # -- request path -------------------------------------------------------------
    def record_inference(self, record: InferenceRecord) -> int:
        """Count and queue one inference; its durable sequence number (0 if dropped)."""
        self.metrics.observe(record)
        self.alerts.observe(record.total_s, record.status < 500)
        return self.store.add(record)

    def record_feedback(self, record: FeedbackRecord) -> int:
        return self.store.add(record)

    def record_event(self, record: EventRecord) -> int:
        return self.store.add(record)

    def subject_hash(self, subject: str) -> str:
        """A keyed hash: the raw subject id never reaches SQLite or upstream."""
        return hmac.new(self._subject_key, subject.encode(), hashlib.sha256).hexdigest()[:32]

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self.store.start()
        self._tasks.append(asyncio.create_task(self._maintain()))
        if self.sync is not None:
            self._tasks.append(asyncio.create_task(self.sync.run()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await asyncio.to_thread(self.store.flush, 10.0)
        await asyncio.to_thread(self.store.stop)
        if self.sync is not None:
            self.sync.close()

    async def forget(self, subject: str) -> int:
        digest = self.subject_hash(subject)
        future = self.store.submit(lambda c: maintenance.forget_subject(self.store, c, digest))
        return await asyncio.wrap_future(future)

    async def note_rollback(self, model: str, reason: str) -> None:
        self.metrics.rollbacks.labels(model, reason[:60]).inc()
        await self._raise_alerts([self.alerts.note_rollback(model, reason)])

    async def _maintain(self) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.maintenance_interval_s)
            try:
                await asyncio.wrap_future(
                    self.store.submit(
                        lambda c: maintenance.apply_retention(
                            self.store, c, s.retention_days * 86400
                        )
                    )
                )
                await asyncio.wrap_future(
                    self.store.submit(
                        lambda c: maintenance.enforce_size_cap(self.store, c, s.max_db_bytes)
                    )
                )
                await self._raise_alerts(self.alerts.evaluate())
            except Exception as exc:  # maintenance must never stop; say why it failed
                log.error("telemetry maintenance failed error=%r", str(exc))

    async def _raise_alerts(self, changes: list[AlertChange]) -> None:
        for change in changes:
            self.metrics.alerts.labels(change.rule).set(1 if change.state == "firing" else 0)
            log.warning(
                "alert rule=%s state=%s message=%r", change.rule, change.state, change.message
            )
            self.store.submit(
                lambda c, ch=change: c.execute(
                    "INSERT INTO alerts (record_id, rule, state, value, message, time, data_region)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        f"alert-{secrets.token_hex(8)}",
                        ch.rule,
                        ch.state,
                        ch.value,
                        ch.message,
                        time.time(),
                        self.store.data_region,
                    ),
                )
            )
            if self.settings.alerts.webhook_url:
                await _post_webhook(self.settings.alerts.webhook_url, change)


async def _post_webhook(url: str, change: AlertChange) -> None:
    try:
        async with httpx.AsyncClient(
            timeout=5.0, follow_redirects=False, trust_env=False
        ) as client:
            await client.post(
                url,
                json={
                    "rule": change.rule,
                    "state": change.state,
                    "value": change.value,
                    "message": change.message,
                },
            )
    except httpx.HTTPError as exc:
        log.warning("alert webhook failed error=%s", type(exc).__name__)


def _subject_key(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = secrets.token_bytes(32)
    path.touch(mode=0o600)
    path.write_bytes(key)
    return key
