"""Prometheus metrics on a registry of our own (several apps can live in one process).

Request metrics cost the request path nothing: the writer thread folds each batch of
inference records into plain counters and bucket arrays (`InferenceMetrics.observe_batch`,
grouped by labels, one numpy bucketing per series and batch)
and a custom collector renders them when scraped, so they lag by at most one
`write_interval_ms` (`/metrics` asks the writer to catch up first). Records dropped
because the queue was full are still counted here (`observe_one`).
"""

from __future__ import annotations

import bisect
import operator
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from edgeserve.telemetry.records import InferenceRecord

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
NUMPY_FROM = 32  # values in one histogram update from which numpy beats a bisect loop


def _fields(*names: str) -> operator.itemgetter:
    """A getter of an InferenceRecord's fields by position: it reads them in C."""
    return operator.itemgetter(*(InferenceRecord._fields.index(name) for name in names))


_LABELS = _fields("model", "version", "variant", "status")
_TOTAL_S = _fields("total_s")
_QUEUE_S = _fields("queue_s")
_COMPUTE_S = _fields("compute_s")
_BATCH_SIZE = _fields("batch_size")


class _Histogram:
    """Bucket counts and a sum; updated by one thread at a time (under the owner's lock)."""

    __slots__ = ("_edges", "bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0
        self._edges = np.asarray(bounds, dtype=np.float64)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def observe_many(self, values: list[float]) -> None:
        """A batch of values: numpy's searchsorted (bisect_left's rule) past a few."""
        if len(values) < NUMPY_FROM:
            for value in values:
                self.observe(value)
            return
        index = np.searchsorted(self._edges, np.asarray(values, dtype=np.float64), "left")
        for i, n in enumerate(np.bincount(index, minlength=len(self.counts)).tolist()):
            self.counts[i] += n
        self.total += sum(values)

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, count in zip(
            (*map(floatToGoString, self.bounds), "+Inf"), self.counts, strict=True
        ):
            running += count
            out.append((bound, running))
        return out


@dataclass(frozen=True)
class Snapshot:
    """Request counts by (model, version, variant, status); per (model, version) the
    bucket counts (not cumulative, +Inf last) and sum of total, queue, compute seconds."""

    requests: dict[tuple[str, str, str, str], int]
    latency: dict[tuple[str, str], tuple[tuple[list[int], float], ...]]


class InferenceMetrics:
    """Request counts and latency/queue/compute/batch-size histograms, rendered on scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str, str], int] = {}
        self._latency: dict[tuple[str, str], tuple[_Histogram, _Histogram, _Histogram]] = {}
        self._batch: dict[str, _Histogram] = {}

    def observe_batch(self, records: Iterable[object]) -> None:
        """Fold in a writer batch: records are grouped by their labels first, so each
        series is updated once a batch, its histograms with one numpy call each."""
        inferences = [r for r in records if type(r) is InferenceRecord]
        if not inferences:
            return
        keys = list(map(_LABELS, inferences))
        groups: dict[tuple[str, str, str | None, int], list[InferenceRecord]]
        if keys.count(keys[0]) == len(keys):  # the usual batch: one series
            groups = {keys[0]: inferences}
        else:
            groups = {}
            for key, r in zip(keys, inferences, strict=True):
                group = groups.get(key)
                if group is None:
                    groups[key] = [r]
                else:
                    group.append(r)
        with self._lock:
            for (model, version, variant, status), group in groups.items():
                self._observe(model, version, variant, status, group)

    def observe_one(self, record: InferenceRecord) -> None:
        """A record that will not reach the writer (dropped at a full queue)."""
        r = record
        with self._lock:
            self._observe(r.model, r.version, r.variant, r.status, [r])

    def _observe(
        self,
        model: str,
        version: str,
        variant: str | None,
        status: int,
        group: list[InferenceRecord],
    ) -> None:
        key = (model, version, variant or "", str(status))
        self._requests[key] = self._requests.get(key, 0) + len(group)
        hists = self._latency.get((model, version))
        if hists is None:
            hists = (
                _Histogram(LATENCY_BUCKETS),
                _Histogram(LATENCY_BUCKETS),
                _Histogram(LATENCY_BUCKETS),
            )
            self._latency[(model, version)] = hists
        # map(itemgetter) reads the fields in C: a list comprehension of attribute reads
        # was most of the writer's metrics work.
        hists[0].observe_many(list(map(_TOTAL_S, group)))
        if status == 200:
            hists[1].observe_many(list(map(_QUEUE_S, group)))
            hists[2].observe_many(list(map(_COMPUTE_S, group)))
            batch = self._batch.get(model)
            if batch is None:
                batch = self._batch[model] = _Histogram(BATCH_BUCKETS)
            batch.observe_many(list(map(_BATCH_SIZE, group)))

    def snapshot(self) -> Snapshot:
        """A consistent copy of the aggregates, for OTLP metrics upstream."""
        with self._lock:
            return Snapshot(
                requests=dict(self._requests),
                latency={
                    labels: tuple((list(h.counts), h.total) for h in hists)
                    for labels, hists in self._latency.items()
                },
            )

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            requests = CounterMetricFamily(
                "edgeserve_requests",
                "Inference requests",
                labels=["model", "version", "variant", "status"],
            )
            for key, n in self._requests.items():
                requests.add_metric(list(key), n)
            yield requests
            names = (
                ("edgeserve_request_duration_seconds", "Request latency"),
                ("edgeserve_queue_duration_seconds", "Time queued before the runtime"),
                ("edgeserve_compute_duration_seconds", "Time in the runtime"),
            )
            for i, (name, help_text) in enumerate(names):
                family = HistogramMetricFamily(name, help_text, labels=["model", "version"])
                for labels, hists in self._latency.items():
                    h = hists[i]
                    family.add_metric(list(labels), h.cumulative(), h.total)
                yield family
            batch = HistogramMetricFamily(
                "edgeserve_batch_size", "Rows per runtime call", labels=["model"]
            )
            for model, h in self._batch.items():
                batch.add_metric([model], h.cumulative(), h.total)
            yield batch


class ProcessCollector:
    """CPU seconds and resident memory of this process, via psutil."""

    def __init__(self) -> None:
        self._process = psutil.Process()

    def collect(self) -> Iterator[Metric]:
        times = self._process.cpu_times()
        cpu = CounterMetricFamily("edgeserve_process_cpu_seconds", "CPU time used by edgeserve")
        cpu.add_metric([], times.user + times.system)
        yield cpu
        rss = GaugeMetricFamily("edgeserve_process_resident_memory_bytes", "Resident memory")
        rss.add_metric([], self._process.memory_info().rss)
        yield rss


@dataclass(frozen=True, eq=False)  # hashed by identity, as the collector registry needs
class ReadCounter:
    """Counters kept elsewhere (label values -> count), read when scraped; exported as
    `<name>_total`."""

    name: str
    documentation: str
    labels: Sequence[str]
    read: Callable[[], Mapping[tuple[str, ...], float]]

    def collect(self) -> Iterator[Metric]:
        counter = CounterMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for values, count in self.read().items():
            counter.add_metric(list(values), count)
        yield counter


# Label values of the event counters, exported at 0 from the start: Prometheus'
# increase() only sees an event on a series that existed before it.
DROP_REASONS = ("queue_full", "write_error", "retention", "size_cap", "upstream_rejected")
ROLLBACK_REASONS = ("health_watch", "manual")


def rollback_reason(text: str) -> str:
    """The `reason` label of a rollback (an enum; the free text goes to the alert)."""
    return "health_watch" if text.startswith("health watch") else "manual"


class Metrics:
    """Every metric edgeserve exports, on one registry per application."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.inferences = InferenceMetrics()
        r.register(self.inferences)  # type: ignore[arg-type]
        self.dropped = Counter(
            "edgeserve_telemetry_dropped",
            "Telemetry records dropped (queue full, size cap, retention, write error)",
            ["table", "reason"],
            registry=r,
        )
        self.rollbacks = Counter(
            "edgeserve_update_rollbacks", "Model update rollbacks", ["model", "reason"], registry=r
        )
        self.update_state = Gauge(
            "edgeserve_update_state",
            "1 for the state each model's update is in (idle, staged, validating, ...)",
            ["model", "state"],
            registry=r,
        )
        self.alerts = Gauge(
            "edgeserve_alerts_firing", "Alert rules firing (1) or not (0)", ["rule"], registry=r
        )
        self.sync_sent = Counter(
            "edgeserve_sync_sent_records", "Records acknowledged by upstream", registry=r
        )
        self.sync_failures = Counter(
            "edgeserve_sync_failures", "Upstream uploads that failed", ["reason"], registry=r
        )
        r.register(ProcessCollector())  # type: ignore[arg-type]
        self._update_states: dict[str, str] = {}

    def expect_drops(self, tables: Sequence[str]) -> None:
        """Export every (table, reason) drop counter at 0 before the first drop."""
        for table in tables:
            for reason in DROP_REASONS:
                self.dropped.labels(table, reason)

    def expect_rollbacks(self, models: Sequence[str]) -> None:
        """Export every (model, reason) rollback counter at 0 before the first one."""
        for model in models:
            for reason in ROLLBACK_REASONS:
                self.rollbacks.labels(model, reason)

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read when scraped (queue depth, backlog, sync lag...)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def register(self, collector: ReadCounter) -> None:
        self.registry.register(collector)  # type: ignore[arg-type]

    def set_update_state(self, model: str, state: str) -> None:
        """Exactly one state per model reads 1."""
        previous = self._update_states.get(model)
        if previous is not None and previous != state:
            self.update_state.remove(model, previous)
        self._update_states[model] = state
        self.update_state.labels(model, state).set(1)

    def render(self) -> tuple[bytes, str]:
        return render_metrics(self.registry)


def render_metrics(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The Prometheus text exposition of `registry` and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
