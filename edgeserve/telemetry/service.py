"""The telemetry subsystem as the server sees it: record, export, sync, keep in bounds.

`record_ended` is the only call on the request path: one short lock and a deque append
(`TelemetryStore.add`) for a record `InferenceRecord.ended` cut to its bounds as it made
it; `record_inference` first cuts a record made any other way (`records.bounded`).
Metrics and alert windows are fed by the writer thread a batch at a time; sync,
maintenance and alert evaluation are asyncio tasks started by `start()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import os
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client import Counter

from edgeserve.auth.secret_files import read_or_create_secret
from edgeserve.errors import Overloaded
from edgeserve.telemetry import audit, maintenance, payloads
from edgeserve.telemetry.alerts import AlertChange, AlertRules
from edgeserve.telemetry.feedback import label_refusal
from edgeserve.telemetry.metrics import Metrics, rollback_reason
from edgeserve.telemetry.records import (
    SUBJECT_HASH_CHARS,
    AlertRecord,
    AuditRecord,
    EventRecord,
    FeedbackRecord,
    InferenceRecord,
    bounded,
)
from edgeserve.telemetry.settings import TelemetrySettings
from edgeserve.telemetry.store import RECORD_TABLE, TelemetryStore
from edgeserve.telemetry.sync import REJECTING_RULE, UpstreamSync

# Labels that may wait for the one-label check (each is an open request).
MAX_FEEDBACK_WAITING = 256

log = logging.getLogger(__name__)

CORRUPT_RULE = "telemetry_buffer_corrupt"
CAP_CHUNKS_PER_STEP = 8  # size-cap work per writer turn, so record batches interleave
# Subject hashes remembered: a token's subject is the same on every request it makes,
# and its HMAC cost the event loop more than the rest of the telemetry record. Bounded
# in entries (emptied when full) and in the length of a subject kept.
SUBJECT_MEMO_ENTRIES = 1024
SUBJECT_MEMO_MAX_CHARS = 256


class Telemetry:
    """Owns the store, metrics, sync, alerts and maintenance of one server process."""

    def __init__(
        self,
        settings: TelemetrySettings,
        state_dir: Path,
        queue_fill: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.settings = settings
        self._feedback_lock = asyncio.Lock()  # one label checked and queued at a time
        self._feedback_waiting = 0
        self.metrics = Metrics()
        self.store = TelemetryStore(
            state_dir / "telemetry.db",
            settings.data_region,
            settings.queue_records,
            settings.write_batch_records,
            settings.write_interval_ms / 1000.0,
            on_drop=lambda table, reason, n: self.metrics.dropped.labels(table, reason).inc(n),
            on_batch=self._observe_batch,
            on_commit=self._keep_under_cap,
            wal_budget_bytes=maintenance.wal_budget(settings.max_db_bytes),
        )
        self.metrics.expect_drops(sorted(set(RECORD_TABLE.values())))
        self._subject_key = secret_key(state_dir / "keys" / "subject.key")
        self._subject_memo: dict[str, str] = {}
        self._payload_key = secret_key(state_dir / "keys" / "payload.key")
        self.sync = (
            UpstreamSync(
                self.store,
                settings.upstream,
                instance_id(state_dir),
                self.metrics,
                on_alert=self._raise_alerts,
            )
            if settings.upstream.url
            else None
        )
        self.firing: set[str] = set()  # alert rules firing now (rules and the sync's own)
        quarantined = Counter(
            "edgeserve_telemetry_quarantined",
            "Telemetry buffers found unreadable at start and moved aside",
            registry=self.metrics.registry,
        )
        if self.store.quarantined is not None:
            quarantined.inc()
        self.dead_letters = 0  # as of the last maintenance or refusal
        self.alerts = AlertRules(settings.alerts, queue_fill, self.backlog_age_s)
        self.unsynced_records = 0
        m = self.metrics
        m.gauge(
            "edgeserve_telemetry_backlog_records",
            "Records queued in memory, not yet written",
            self.store.backlog_in_memory,
        )
        m.gauge(
            "edgeserve_telemetry_unsynced_records",
            "Rows in the buffer not yet acknowledged upstream (as of the last maintenance)",
            lambda: self.unsynced_records,
        )
        m.gauge("edgeserve_sync_lag_seconds", "Age of the oldest unsynced row", self.backlog_age_s)
        m.gauge(
            "edgeserve_telemetry_dead_letter_records",
            "Records the collector refused for good, kept in dead_letters (bounded)",
            lambda: self.dead_letters,
        )
        m.gauge(
            "edgeserve_sync_breaker_open",
            "1 while uploads are paused after a run of failures or refusals",
            lambda: float(self.sync is not None and self.sync.breaker_open),
        )
        m.gauge(
            "edgeserve_telemetry_db_bytes",
            "Size of the telemetry database and its WAL",
            lambda: maintenance.database_bytes(self.store.path),
        )
        self._tasks: list[asyncio.Task] = []

    # -- request path -------------------------------------------------------------
    def record_inference(self, record: InferenceRecord) -> int:
        """Queue one inference, cut to its bounds; its sequence number (0 if dropped).
        Never blocks or raises; metrics and the row are built by the writer."""
        return self.record_ended(bounded(record))

    def record_ended(self, record: InferenceRecord) -> int:
        """Queue an inference made by `InferenceRecord.ended` (cut to its bounds as it
        was made); its sequence number, 0 if dropped."""
        seq = self.store.add(record)
        if not seq:  # dropped: still counted in the request metrics
            self.metrics.inferences.observe_one(record)
        return seq

    def record_id(self, seq: int) -> str:
        """`<boot>-<seq>`: the record's id and its `x-telemetry-seq` (README, Telemetry)."""
        return self.store.record_id(seq)

    def record_feedback(self, record: FeedbackRecord) -> int:
        """Queue a label without any check (trusted callers: tests, imports)."""
        return self.store.add(record)

    async def accept_feedback(self, record: FeedbackRecord, owner_hash: str | None) -> int:
        """Queue a label from a client once `feedback.label_refusal` allows it (raises
        its error otherwise); its sequence number, 0 if the queue dropped it.

        One label at a time: each check runs after the previous label is committed,
        so two copies sent at once cannot both pass the one-label rule. The line of
        labels waiting for their turn is bounded: past it the answer is 429 at once."""
        if self._feedback_waiting >= MAX_FEEDBACK_WAITING:
            raise Overloaded(
                "too many labels waiting to be checked; retry later", headers={"Retry-After": "1"}
            )
        self._feedback_waiting += 1
        try:
            await self._feedback_lock.acquire()
        finally:
            self._feedback_waiting -= 1
        try:
            refusal = await asyncio.wrap_future(
                self.store.submit(
                    functools.partial(
                        label_refusal, request_id=record.request_id, owner_hash=owner_hash
                    )
                )
            )
            if refusal is not None:
                raise refusal
            return self.store.add(record)
        finally:
            self._feedback_lock.release()

    def record_event(self, record: EventRecord) -> int:
        return self.store.add(record)

    def record_payload(self, request_id: str, model: str, version: str, body: bytes) -> int:
        """Keep a request body, sealed (call only for models that opt in)."""
        try:
            record = payloads.seal(self._payload_key, request_id, model, version, body)
        except Exception:  # never raise on the request path
            log.exception("payload sealing failed request_id=%s", request_id)
            return 0
        return self.store.add(record)

    def read_payload(self, request_id: str, model: str, version: str, row: tuple) -> bytes:
        """Open a kept body from its (nonce, ciphertext) columns."""
        return payloads.open_sealed(self._payload_key, request_id, model, version, *row)

    def record_alert(self, record: AlertRecord) -> int:
        return self.store.add(record)

    def record_audit(
        self,
        action: str,
        target: str,
        outcome: str,
        subject: str = "",
        detail: dict[str, Any] | None = None,
    ) -> int:
        """An audit entry for upstream (the box's own log is edgeserve.audit)."""
        text = orjson.dumps(detail or {}, option=orjson.OPT_SORT_KEYS).decode()
        return self.store.add(AuditRecord(action, target, outcome, subject, text, time.time()))

    def subject_hash(self, subject: str) -> str:
        """A keyed hash: the raw subject id never reaches SQLite or upstream."""
        memo = self._subject_memo
        found = memo.get(subject)
        if found is None:
            found = hash_subject(self._subject_key, subject)
            if len(subject) <= SUBJECT_MEMO_MAX_CHARS:
                if len(memo) >= SUBJECT_MEMO_ENTRIES:
                    memo.clear()
                memo[subject] = found
        return found

    @property
    def durable_seq(self) -> int:
        return self.store.durable_seq

    def backlog_age_s(self) -> float:
        return self.sync.lag_s if self.sync else 0.0

    def set_update_state(self, model: str, state: str) -> None:
        self.metrics.set_update_state(model, state)

    def _observe_batch(self, records: Sequence[Any]) -> None:
        # On the writer thread, before the batch is written.
        self.metrics.inferences.observe_batch(records)
        self.alerts.observe_batch(records)

    def _keep_under_cap(self, conn: Any) -> None:
        # After every committed batch (a stat call): the cap holds between maintenance runs.
        if maintenance.over_trigger(self.store.path, self.settings.max_db_bytes):
            maintenance.enforce_size_cap(
                self.store, conn, self.settings.max_db_bytes, CAP_CHUNKS_PER_STEP
            )

    async def render_metrics(self, catch_up_s: float = 1.0) -> tuple[bytes, str]:
        """The scrape, after the writer has folded in every record accepted so far."""
        target = self.store.last_seq
        deadline = time.monotonic() + catch_up_s
        while self.store.observed_seq < target and time.monotonic() < deadline:
            self.store.nudge()
            await asyncio.sleep(0.002)
        return self.metrics.render()

    # -- lifecycle ------------------------------------------------------------------
    async def start(self) -> None:
        self.store.start()
        if self.store.quarantined is not None:
            aside, lost = self.store.quarantined
            rows = "could not be counted" if lost is None else f"{lost} unsynced rows dropped"
            message = f"telemetry buffer was unreadable, moved to {aside.name}; {rows}"
            await self._raise_alerts(
                [AlertChange(CORRUPT_RULE, "firing", float(lost or 0), message)]
            )
        self._tasks.append(asyncio.create_task(self._maintain()))
        self._tasks.append(asyncio.create_task(self._evaluate_alerts()))
        if self.sync is not None:
            self._tasks.append(asyncio.create_task(self.sync.run()))

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the tasks, then commit what is still queued (bounded by `timeout_s`)."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if not await asyncio.to_thread(self.store.flush, timeout_s):
            log.warning("telemetry flush timed out queued=%d", self.store.backlog_in_memory())
        await asyncio.to_thread(self.store.stop)

    async def flush(self, timeout_s: float = 10.0) -> bool:
        return await asyncio.to_thread(self.store.flush, timeout_s)

    async def forget(self, subject: str) -> int:
        digest = self.subject_hash(subject)
        future = self.store.submit(lambda c: maintenance.forget_subject(self.store, c, digest))
        return await asyncio.wrap_future(future)

    async def verify_audit(self) -> audit.ChainReport:
        return await asyncio.wrap_future(self.store.submit(audit.verify))

    def expect_rollbacks(self, models: Sequence[str]) -> None:
        self.metrics.expect_rollbacks(models)

    async def note_rollback(self, model: str, reason: str) -> None:
        self.metrics.rollbacks.labels(model, rollback_reason(reason)).inc()
        await self._raise_alerts([self.alerts.note_rollback(model, reason)])

    async def raise_alert(self, rule: str, state: str, value: float, message: str) -> None:
        """An alert from outside the rules (prediction drift): stored, exported, posted."""
        await self._raise_alerts([AlertChange(rule, state, value, message)])

    async def maintain_once(self) -> None:
        """Retention, then the size cap in bounded steps, then the unsynced count."""
        s = self.settings
        await self._in_writer(
            lambda c: maintenance.apply_retention(self.store, c, s.retention.max_age_s())
        )
        while await self._in_writer(
            lambda c: maintenance.enforce_size_cap(
                self.store, c, s.max_db_bytes, CAP_CHUNKS_PER_STEP
            )
        ):
            pass
        self.unsynced_records = await self._in_writer(maintenance.count_unsynced)
        self.dead_letters = await self._in_writer(maintenance.dead_letter_count)

    async def _in_writer(self, command: Callable[[Any], Any]) -> Any:
        return await asyncio.wrap_future(self.store.submit(command))

    async def _maintain(self) -> None:
        while True:
            try:
                await self.maintain_once()
            except Exception as exc:  # maintenance must never stop; say why it failed
                log.error("telemetry maintenance failed error=%r", str(exc))
            await asyncio.sleep(self.settings.maintenance_interval_s)

    async def evaluate_alerts(self) -> list[AlertChange]:
        """Evaluate the rules now; store, export and post what changed."""
        changes = self.alerts.evaluate()
        await self._raise_alerts(changes)
        return changes

    async def _evaluate_alerts(self) -> None:
        while True:
            await asyncio.sleep(self.settings.alerts.evaluate_interval_s)
            try:
                await self.evaluate_alerts()
            except Exception as exc:
                log.error("alert evaluation failed error=%r", str(exc))

    async def _raise_alerts(self, changes: list[AlertChange]) -> None:
        for change in changes:
            self.metrics.alerts.labels(change.rule).set(1 if change.state == "firing" else 0)
            if change.state == "firing":
                self.firing.add(change.rule)
            else:
                self.firing.discard(change.rule)
            if change.rule == REJECTING_RULE:  # the refusals are in dead_letters now
                self.dead_letters = await self._in_writer(maintenance.dead_letter_count)
            log.warning(
                "alert rule=%s state=%s message=%r", change.rule, change.state, change.message
            )
            self.record_alert(
                AlertRecord(change.rule, change.state, change.value, change.message, time.time())
            )
            if self.settings.alerts.webhook_url:
                await _post_webhook(self.settings.alerts.webhook_url, change)


def build_telemetry(
    settings: TelemetrySettings,
    state_dir: Path,
    queue_fill: Callable[[], float] = lambda: 0.0,
) -> Telemetry:
    """The subsystem for one process; nothing runs until `await start()`."""
    return Telemetry(settings, state_dir, queue_fill)


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


def instance_id(state_dir: Path) -> str:
    """This box's `service.instance.id` upstream, stable across restarts."""
    path = state_dir / "instance-id"
    with contextlib.suppress(OSError):
        value = path.read_text().strip()
        if value:
            return value
    value = secrets.token_hex(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    os.replace(tmp, path)
    return value


def hash_subject(key: bytes, subject: str) -> str:
    # hmac.digest is OpenSSL's one-shot HMAC: the same bytes as hmac.new, a third the cost.
    return hmac.digest(key, subject.encode(), "sha256").hex()[:SUBJECT_HASH_CHARS]


def secret_key(path: Path) -> bytes:
    """A per-box 32-byte key (0600), created on first use: subject hashes, payloads."""
    return read_or_create_secret(path)
