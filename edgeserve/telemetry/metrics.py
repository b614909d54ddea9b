"""Prometheus metrics on a registry of our own (several apps can live in one process).

The per-request cost is a few dictionary lookups: label children are cached.
"""

from __future__ import annotations

from collections.abc import Callable

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edgeserve.telemetry.records import InferenceRecord

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ProcessCollector:
    """CPU seconds and resident memory of this process, via psutil."""

    def __init__(self) -> None:
        self._process = psutil.Process()

    def collect(self):  # type: ignore[no-untyped-def]
        times = self._process.cpu_times()
        cpu = CounterMetricFamily("edgeserve_process_cpu_seconds", "CPU time used by edgeserve")
        cpu.add_metric([], times.user + times.system)
        yield cpu
        rss = GaugeMetricFamily("edgeserve_process_resident_memory_bytes", "Resident memory")
        rss.add_metric([], self._process.memory_info().rss)
        yield rss


class Metrics:
    """Every metric edgeserve exports; `observe` is on the request path."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "edgeserve_requests",
            "Inference requests",
            ["model", "version", "variant", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "edgeserve_request_duration_seconds",
            "Request latency",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "edgeserve_queue_duration_seconds",
            "Time queued",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_time = Histogram(
            "edgeserve_compute_duration_seconds",
            "Runtime time",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "edgeserve_batch_size",
            "Rows per runtime call",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.dropped = Counter(
            "edgeserve_telemetry_dropped",
            "Telemetry records dropped",
            ["table", "reason"],
            registry=r,
        )
        self.rollbacks = Counter(
            "edgeserve_update_rollbacks", "Model update rollbacks", ["model", "reason"], registry=r
        )
        self.alerts = Gauge(
            "edgeserve_alerts_firing", "Alert rules firing (1) or not (0)", ["rule"], registry=r
        )
        r.register(ProcessCollector())
        self._children: dict[tuple, tuple] = {}

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read when scraped (queue depth, backlog, sync lag...)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def observe(self, record: InferenceRecord) -> None:
        key = (record.model, record.version, record.variant, record.status)
        children = self._children.get(key)
        if children is None:
            labels = (record.model, record.version)
            children = (
                self.requests.labels(
                    record.model, record.version, record.variant or "", str(record.status)
                ),
                self.latency.labels(*labels),
                self.queue_time.labels(*labels),
                self.compute_time.labels(*labels),
                self.batch_size.labels(record.model),
            )
            self._children[key] = children
        requests, latency, queue_time, compute_time, batch_size = children
        requests.inc()
        latency.observe(record.total_s)
        if record.status == 200:
            queue_time.observe(record.queue_s)
            compute_time.observe(record.compute_s)
            batch_size.observe(record.batch_size)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
