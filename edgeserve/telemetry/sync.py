"""Upstream sync: unsent rows go to an OTLP/HTTP collector in batches, at least once.

The cursor (`synced = 1`) advances only after a 2xx for exactly the rows sent. A
collector that refuses a payload outright (400/413/422) gets smaller batches until
the one refused record is found; that record is marked rejected (`synced = 2`, never
synced), listed in the bounded `dead_letters` table and counted as dropped
(`upstream_rejected`), so one bad row cannot stall the buffer. `breaker_failures`
records refused in a row mean the collector refuses everything: the circuit opens and
the `upstream_rejecting` alert fires, instead of the buffer draining into it.
Failures back off exponentially with full jitter and honour Retry-After up to
`retry_after_max_s` (even beyond `backoff_max_s`); after `breaker_failures` failures
in a row the circuit opens and nothing is sent for `breaker_open_s`. Uploads are paced
(`catch_up_records_per_s`, `catch_up_bytes_per_s`), so a backlog after an outage goes
at a steady rate. Redirects are never followed: a collector that redirects is treated
as failing, so data cannot be steered off the allow-listed hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import gzip
import importlib.util
import logging
import random
import sqlite3
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from edgeserve.config.schema import ConfigError
from edgeserve.protocol.integers import parse_uint
from edgeserve.telemetry import otlp
from edgeserve.telemetry.alerts import AlertChange
from edgeserve.telemetry.maintenance import dead_letter, mark_synced
from edgeserve.telemetry.metrics import Metrics
from edgeserve.telemetry.settings import UpstreamSettings
from edgeserve.telemetry.store import SYNCED_TABLES, TABLES, TelemetryStore

log = logging.getLogger(__name__)

SEND_ORDER = tuple(reversed(SYNCED_TABLES))  # highest priority first; payloads stay here
PERMANENT_STATUSES = frozenset({400, 413, 422})  # OTLP: do not retry the same payload
REJECTING_RULE = "upstream_rejecting"


class UpstreamSync:
    """The background task that empties the buffer into the collector."""

    def __init__(
        self,
        store: TelemetryStore,
        settings: UpstreamSettings,
        instance: str,
        metrics: Metrics | None = None,
        on_alert: Callable[[list[AlertChange]], Awaitable[None]] | None = None,
    ) -> None:
        check_upstream(settings)
        self.store = store
        self.settings = settings
        self.instance = instance
        self.metrics = metrics
        self._on_alert = on_alert
        self.failures = 0
        self.rejected_in_row = 0  # single records refused for good, since the last 2xx
        self.rejecting = False  # the upstream_rejecting alert is firing
        self.sent_records = 0
        self.dead_lettered = 0
        self.paced_s = 0.0  # seconds of upload pacing scheduled so far
        self._next_attempt = 0.0  # time.monotonic() of the next upload; in the past = now
        self._oldest_unsynced: float | None = None
        self._limit = settings.batch_records  # shrinks while isolating a refused record
        self._started_ns = time.time_ns()
        self.metrics_uploads = 0
        self._wake = asyncio.Event()

    @property
    def lag_s(self) -> float:
        """Age of the oldest row not yet acknowledged (as of the last look at the buffer)."""
        oldest = self._oldest_unsynced
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def wake(self) -> None:
        self._wake.set()

    @property
    def retry_in_s(self) -> float:
        """Seconds until the next upload may go (0 = now)."""
        return max(0.0, self._next_attempt - time.monotonic())

    @property
    def breaker_open(self) -> bool:
        """Nothing is sent until the pause after a run of failures or refusals is over."""
        s = self.settings
        tripped = self.failures >= s.breaker_failures or self.rejected_in_row >= s.breaker_failures
        return tripped and self.retry_in_s > 0

    def _client(self) -> httpx.AsyncClient:
        """No redirects, no proxies from the environment, TLS 1.2+, optional client cert."""
        s = self.settings
        context = ssl.create_default_context(cafile=s.ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if s.client_cert:
            context.load_cert_chain(s.client_cert, s.client_key or None)
        return httpx.AsyncClient(
            timeout=s.timeout_s, follow_redirects=False, verify=context, trust_env=False
        )

    def _body(self, request: dict[str, Any]) -> tuple[bytes, str]:
        body, content_type = otlp.encode(request, self.settings.encoding)
        if self.settings.compression == "gzip":
            body = gzip.compress(body, compresslevel=6, mtime=0)
        return body, content_type

    def _headers(self, content_type: str) -> dict[str, str]:
        headers = {"Content-Type": content_type}
        if self.settings.compression == "gzip":
            headers["Content-Encoding"] = "gzip"
        if self.settings.bearer_token_file:
            token = Path(self.settings.bearer_token_file).read_text().strip()
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def run(self, idle_s: float = 1.0) -> None:
        async with self._client() as client:
            aggregates = None
            if self.metrics is not None and self.settings.metrics_interval_s:
                aggregates = asyncio.create_task(self._send_metrics_forever(client))
            try:
                await self._send_rows_forever(client, idle_s)
            finally:
                if aggregates is not None:
                    aggregates.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await aggregates

    async def _send_metrics_forever(self, client: httpx.AsyncClient) -> None:
        """Cumulative aggregates every `metrics_interval_s`; a lost upload is not retried,
        the next one carries the same totals."""
        assert self.metrics is not None
        url = self.settings.metrics_endpoint()
        while True:
            await asyncio.sleep(self.settings.metrics_interval_s)
            request = otlp.export_metrics(
                self.metrics.inferences.snapshot(),
                self.store.data_region,
                self.instance,
                self._started_ns,
                time.time_ns(),
            )
            try:
                body, content_type = self._body(request)
                reply = await client.post(url, content=body, headers=self._headers(content_type))
                if not 200 <= reply.status_code < 300:
                    log.info("upstream metrics refused status=%d", reply.status_code)
                else:
                    self.metrics_uploads += 1
            except (httpx.HTTPError, OSError) as exc:
                log.info("upstream metrics failed reason=%s", type(exc).__name__)
            except Exception:
                log.exception("upstream metrics failed")

    async def _send_rows_forever(self, client: httpx.AsyncClient, idle_s: float) -> None:
        while True:
            try:
                delay = await self._step(client, idle_s)
            except Exception:  # the sync task must outlive any one bad batch
                log.exception("upstream sync step failed")
                delay = self.settings.backoff_max_s
            self._next_attempt = time.monotonic() + delay
            if delay:
                await asyncio.sleep(delay)

    async def _step(self, client: httpx.AsyncClient, idle_s: float) -> float:
        rows = await self._take(self._limit)
        if not rows:
            self._oldest_unsynced = None
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), idle_s)
            return 0.0
        self._oldest_unsynced = min(r["time"] for _, r in rows)
        return await self._send(client, rows)

    async def _send(self, client: httpx.AsyncClient, rows: list[tuple[str, dict]]) -> float:
        """Send one batch taken by `_take`; the seconds to wait before the next attempt
        (the pacing pause after success). Its rows stay passed over by the size cap and
        retention until its answer is handled (acknowledged rows are synced by then)."""
        try:
            return await self._send_once(client, rows)
        finally:
            self.store.sending = {}

    async def _send_once(self, client: httpx.AsyncClient, rows: list[tuple[str, dict]]) -> float:
        request = otlp.export_request(rows, self.store.data_region, self.instance)
        # Encoding and gzip of a large batch take milliseconds: off the event loop.
        body, content_type = await asyncio.to_thread(self._body, request)
        retry_after = None
        status = 0
        try:
            reply = await client.post(
                self.settings.url, content=body, headers=self._headers(content_type)
            )
            status = reply.status_code
            ok = 200 <= status < 300
            if not ok:
                retry_after = _retry_after(reply.headers.get("retry-after"))
                reason = "redirect refused" if 300 <= status < 400 else f"status {status}"
        except (httpx.HTTPError, OSError) as exc:
            ok, reason = False, type(exc).__name__
        if ok:
            await self._advance(rows)
            self.failures = 0
            self.rejected_in_row = 0
            self.sent_records += len(rows)
            self._limit = min(self.settings.batch_records, self._limit * 2)
            if self.metrics is not None:
                self.metrics.sync_sent.inc(len(rows))
            if self.rejecting:
                self.rejecting = False
                await self._alert("resolved", "the collector accepts records again")
            pace = self.pace_s(len(rows), len(body))
            self.paced_s += pace
            return pace
        if self.metrics is not None:
            self.metrics.sync_failures.labels(reason.replace(" ", "_")).inc()
        if status in PERMANENT_STATUSES:
            return await self._rejected(rows, status)
        self.failures += 1
        s = self.settings
        honoured = min(retry_after or 0.0, s.retry_after_max_s)
        if self.failures >= s.breaker_failures:
            log.warning(
                "upstream circuit open failures=%d reason=%s pause_s=%s",
                self.failures,
                reason,
                s.breaker_open_s,
            )
            return max(s.breaker_open_s, honoured)
        backoff = min(s.backoff_max_s, s.backoff_initial_s * 2 ** (self.failures - 1))
        delay = random.uniform(0, backoff)  # full jitter: boxes that lost the link together
        log.info("upstream send failed reason=%s retry_in_s=%.2f", reason, max(delay, honoured))
        return max(delay, honoured)

    def pace_s(self, records: int, body_bytes: int) -> float:
        """The pause after an upload that keeps both rates at or under their bounds."""
        s = self.settings
        return max(records / s.catch_up_records_per_s, body_bytes / s.catch_up_bytes_per_s)

    async def _alert(self, state: str, message: str) -> None:
        if self._on_alert is not None:
            value = float(self.rejected_in_row)
            await self._on_alert([AlertChange(REJECTING_RULE, state, value, message)])

    async def _rejected(self, rows: list[tuple[str, dict]], status: int) -> float:
        """A 400/413/422 will not change on retry: halve the batch to find the record the
        collector refuses; a single refused record is dead-lettered. A run of them opens
        the circuit and raises the `upstream_rejecting` alert."""
        if len(rows) > 1:
            self._limit = max(1, len(rows) // 2)
            log.warning("upstream refused batch status=%d records=%d", status, len(rows))
            return 0.0
        table, row = rows[0]
        log.error(
            "upstream refused record status=%d table=%s record_id=%s",
            status,
            table,
            row["record_id"],
        )
        limit = self.settings.dead_letter_max_records
        marked = await asyncio.wrap_future(
            self.store.submit(
                lambda c: dead_letter(
                    self.store, c, table, (row["seq"], row["record_id"]), status, limit
                )
            )
        )
        self.dead_lettered += int(marked)
        self.rejected_in_row += 1
        s = self.settings
        if self.rejected_in_row < s.breaker_failures:
            return 0.0
        log.warning(
            "upstream circuit open: every record refused rejected_in_row=%d pause_s=%s",
            self.rejected_in_row,
            s.breaker_open_s,
        )
        if not self.rejecting:
            self.rejecting = True
            await self._alert(
                "firing",
                f"the collector refused {self.rejected_in_row} records in a row "
                f"(status {status}); uploads paused for {s.breaker_open_s:g} s",
            )
        return s.breaker_open_s

    async def _advance(self, rows: list[tuple[str, dict]]) -> None:
        """The cursor moves only here, after a 2xx for exactly these rows."""
        for table in TABLES:
            seqs = [r["seq"] for t, r in rows if t == table]
            if seqs:
                await asyncio.wrap_future(
                    self.store.submit(lambda c, t=table, s=seqs: mark_synced(c, t, s))
                )

    async def _take(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Take the next batch: up to `limit` unsent rows, highest priority first, marked
        as on the wire (`store.sending`) in the same writer command that reads them, so no
        eviction or retention can fall between choosing them and protecting them (a row
        delivered must not also be counted as dropped)."""
        taken: list[tuple[str, dict[str, Any]]] = await asyncio.wrap_future(
            self.store.submit(functools.partial(take_batch, self.store, limit=limit))
        )
        return taken


def take_batch(
    store: TelemetryStore, conn: sqlite3.Connection, limit: int
) -> list[tuple[str, dict[str, Any]]]:
    """On the writer thread: the oldest `limit` unsent rows in `SEND_ORDER`, recorded in
    `store.sending` before any other command (the size cap, retention) can run."""
    rows: list[tuple[str, dict[str, Any]]] = []
    for table in SEND_ORDER:
        if len(rows) >= limit:
            break
        cursor = conn.execute(
            f"SELECT * FROM {table} WHERE synced = 0 ORDER BY seq LIMIT ?", (limit - len(rows),)
        )
        names = [d[0] for d in cursor.description]
        rows += [(table, dict(zip(names, r, strict=True))) for r in cursor.fetchall()]
    sending: dict[str, set[int]] = {}
    for table, row in rows:
        sending.setdefault(table, set()).add(row["seq"])
    store.sending = {table: frozenset(seqs) for table, seqs in sending.items()}
    return rows


def check_upstream(settings: UpstreamSettings) -> None:
    """Refuse to start towards a host off the allow-list, or without the protobuf codec."""
    for key, url in (("url", settings.url), ("metrics_url", settings.metrics_endpoint())):
        host = urllib.parse.urlsplit(url).hostname
        if host not in settings.allowed_hosts:
            raise ConfigError(
                f"telemetry.upstream.{key}",
                f"host {host!r} is not in telemetry.upstream.allowed_hosts",
            )
    if settings.encoding == "protobuf" and importlib.util.find_spec("opentelemetry") is None:
        raise ConfigError(
            "telemetry.upstream.encoding",
            '"protobuf" needs the opentelemetry-proto package (pip install opentelemetry-proto)',
        )


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    seconds = parse_uint(value.strip())
    if seconds is not None:
        return float(seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
