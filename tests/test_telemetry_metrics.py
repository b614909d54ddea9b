"""Metrics and alert rules of the telemetry library, without a server."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeserve.telemetry.alerts import AlertRules
from edgeserve.telemetry.records import InferenceRecord
from edgeserve.telemetry.service import Telemetry, build_telemetry
from edgeserve.telemetry.settings import AlertSettings, TelemetrySettings


def _record(
    status: int = 200, total_s: float = 0.003, variant: str | None = "a"
) -> InferenceRecord:
    return InferenceRecord(
        "r", "digits", "2", status, total_s, 0.001, 0.0015, 4, time.time(), variant=variant
    )


def _samples(telemetry: Telemetry) -> dict[tuple[str, tuple], float]:
    body, content_type = asyncio.run(telemetry.render_metrics())
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_scrape_counts_every_record_accepted_before_it(tmp_path: Path) -> None:
    telemetry = build_telemetry(TelemetrySettings(write_interval_ms=60_000.0), tmp_path)
    telemetry.store.start()  # a long interval: the scrape itself must make the writer catch up
    for _ in range(7):
        telemetry.record_inference(_record())
    telemetry.record_inference(_record(status=500, total_s=0.2))
    telemetry.set_update_state("digits", "validating")
    telemetry.set_update_state("digits", "idle")
    samples = _samples(telemetry)
    telemetry.store.stop()
    labels = (("model", "digits"), ("status", "200"), ("variant", "a"), ("version", "2"))
    assert samples[("edgeserve_requests_total", labels)] == 7
    hist = (("model", "digits"), ("version", "2"))
    assert samples[("edgeserve_request_duration_seconds_count", hist)] == 8
    assert samples[("edgeserve_request_duration_seconds_bucket", (("le", "0.005"), *hist))] == 7
    assert samples[("edgeserve_compute_duration_seconds_count", hist)] == 7  # successes only
    assert samples[("edgeserve_batch_size_sum", (("model", "digits"),))] == 28
    assert samples[("edgeserve_update_state", (("model", "digits"), ("state", "idle")))] == 1
    assert ("edgeserve_update_state", (("model", "digits"), ("state", "validating"))) not in samples
    assert ("edgeserve_process_resident_memory_bytes", ()) in samples


def test_two_apps_in_one_process_keep_separate_metrics(tmp_path: Path) -> None:
    one = build_telemetry(TelemetrySettings(), tmp_path / "one")
    two = build_telemetry(TelemetrySettings(), tmp_path / "two")
    for t in (one, two):
        t.store.start()
    one.record_inference(_record())
    counts = [
        sum(v for (n, _), v in _samples(t).items() if n == "edgeserve_requests_total")
        for t in (one, two)
    ]
    for t in (one, two):
        t.store.stop()
    assert counts == [1, 0]


def test_a_full_queue_is_counted_in_metrics_not_waited_for(tmp_path: Path) -> None:
    telemetry = build_telemetry(TelemetrySettings(queue_records=100), tmp_path)  # not started
    seqs = [telemetry.record_inference(_record()) for _ in range(130)]
    assert seqs.count(0) == 30
    registry = telemetry.metrics.registry
    dropped = {"table": "inferences", "reason": "queue_full"}
    assert registry.get_sample_value("edgeserve_telemetry_dropped_total", dropped) == 30
    telemetry.store.start()
    assert telemetry.store.flush(10)
    total = sum(v for (n, _), v in _samples(telemetry).items() if n == "edgeserve_requests_total")
    telemetry.store.stop()
    assert total == 130  # the dropped ones still count as requests


@pytest.mark.parametrize(
    ("settings", "latencies_s", "statuses", "fires"),
    [
        (
            AlertSettings(p99_latency_ms=50, queue_saturation=0),
            [0.01] * 99 + [0.2] * 2,
            [200],
            {"p99_latency"},
        ),
        (AlertSettings(p99_latency_ms=50, queue_saturation=0), [0.01] * 100, [200], set()),
        (
            AlertSettings(error_rate=0.1, queue_saturation=0),
            [0.01] * 10,
            [200, 500],
            {"error_rate"},
        ),
        (AlertSettings(error_rate=0.6, queue_saturation=0), [0.01] * 10, [200, 500], set()),
    ],
)
def test_alert_rules_fire_over_their_threshold(
    settings: AlertSettings, latencies_s: list[float], statuses: list[int], fires: set[str]
) -> None:
    rules = AlertRules(settings, lambda: 0.0, lambda: 0.0)
    rules.observe_batch(
        _record(statuses[i % len(statuses)], total_s) for i, total_s in enumerate(latencies_s)
    )
    assert {c.rule for c in rules.evaluate() if c.state == "firing"} == fires


def test_an_alert_fires_only_after_holding_for_for_s_and_then_resolves() -> None:
    fill = [0.95]
    rules = AlertRules(AlertSettings(queue_saturation=0.9, for_s=30), lambda: fill[0], lambda: 0)
    start = time.time()
    assert rules.evaluate(start) == []
    assert rules.evaluate(start + 29) == []
    (change,) = rules.evaluate(start + 31)
    assert (change.rule, change.state) == ("queue_saturation", "firing")
    assert rules.evaluate(start + 40) == []  # stays firing, said once
    fill[0] = 0.1
    (change,) = rules.evaluate(start + 41)
    assert (change.rule, change.state) == ("queue_saturation", "resolved")


def test_a_firing_alert_is_stored_and_exported(tmp_path: Path) -> None:
    settings = TelemetrySettings(alerts=AlertSettings(queue_saturation=0.5))
    telemetry = Telemetry(settings, tmp_path, queue_fill=lambda: 0.8)

    async def run() -> None:
        telemetry.store.start()
        await telemetry.evaluate_alerts()
        await telemetry.note_rollback("digits", "health check failed")
        assert await telemetry.flush(10)

    asyncio.run(run())
    with sqlite3.connect(telemetry.store.path) as db:
        rows = db.execute("SELECT rule, state FROM alerts ORDER BY seq").fetchall()
    registry = telemetry.metrics.registry
    telemetry.store.stop()
    assert rows == [("queue_saturation", "firing"), ("update_rolled_back", "firing")]
    assert registry.get_sample_value("edgeserve_alerts_firing", {"rule": "queue_saturation"}) == 1


def test_a_burst_of_records_is_stored_and_counted_exactly_once(tmp_path: Path) -> None:
    """50,000 records queued as fast as the request path can: every one becomes a row
    and one count (the timing of this loop is bench/telemetry_cost.py's, not a test's)."""
    telemetry = build_telemetry(TelemetrySettings(queue_records=1_000_000), tmp_path)
    telemetry.store.start()
    seqs = [telemetry.record_inference(_record()) for _ in range(50_000)]
    assert telemetry.store.flush(120)
    samples = _samples(telemetry)
    telemetry.store.stop()
    assert seqs == list(range(seqs[0], seqs[0] + 50_000))  # none dropped, in order
    with sqlite3.connect(telemetry.store.path) as db:
        assert db.execute("SELECT count(*) FROM inferences").fetchone()[0] == 50_000
    served = [v for (name, _), v in samples.items() if name == "edgeserve_requests_total"]
    assert sum(served) == 50_000
