"""Telemetry as OTLP: rows as log records (ExportLogsServiceRequest), aggregates as
metrics (ExportMetricsServiceRequest), in the OTLP JSON mapping.

Each log record carries `log.record.uid` (the OpenTelemetry semantic convention),
stable across retries, so a receiver can drop duplicates; `edgeserve.record_id` is
the same id under its old name, kept for one release (removed in the next); the
resource carries `edgeserve.data_region`. Metrics are
cumulative sums and histograms since the process started, so a lost upload costs
nothing: the next one carries the same totals and more.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from edgeserve.telemetry.metrics import LATENCY_BUCKETS, Snapshot

SEVERITY_INFO = 9
SEVERITY_WARN = 13
CUMULATIVE = 2  # AGGREGATION_TEMPORALITY_CUMULATIVE
HISTOGRAM_NAMES = (
    "edgeserve.request.duration",
    "edgeserve.queue.duration",
    "edgeserve.compute.duration",
)
_NON_FINITE = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _value(v: Any) -> dict[str, Any]:
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        # proto3 JSON spells non-finite doubles as strings; orjson would write null.
        return {"doubleValue": v if math.isfinite(v) else _NON_FINITE[str(v)]}
    return {"stringValue": str(v)}


def log_record(table: str, row: dict[str, Any]) -> dict[str, Any]:
    skip = {"seq", "synced", "data_region", "time"}
    attributes = [
        {"key": "edgeserve.kind", "value": {"stringValue": table}},
        # The semantic convention's record id: any collector can drop duplicates by it.
        {"key": "log.record.uid", "value": {"stringValue": str(row["record_id"])}},
    ]
    attributes += [
        {"key": f"edgeserve.{k}", "value": _value(v)}
        for k, v in row.items()
        if k not in skip and v is not None
    ]
    nanos = str(int(row["time"] * 1e9))
    severity = SEVERITY_WARN if table == "alerts" else SEVERITY_INFO
    return {
        "timeUnixNano": nanos,
        "observedTimeUnixNano": nanos,
        "severityNumber": severity,
        "severityText": "WARN" if severity == SEVERITY_WARN else "INFO",
        "body": {"stringValue": table},
        "attributes": attributes,
    }


def _resource(data_region: str, service_instance: str) -> dict[str, Any]:
    return {
        "attributes": [
            {"key": "service.name", "value": {"stringValue": "edgeserve"}},
            {"key": "service.instance.id", "value": {"stringValue": service_instance}},
            {"key": "edgeserve.data_region", "value": {"stringValue": data_region}},
        ]
    }


def _attributes(**labels: str) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"stringValue": v}} for k, v in labels.items()]


def export_metrics(
    snapshot: Snapshot,
    data_region: str,
    service_instance: str,
    start_unix_nano: int,
    now_unix_nano: int,
) -> dict[str, Any]:
    """Request counts and latency histograms as cumulative OTLP metrics."""
    times = {"startTimeUnixNano": str(start_unix_nano), "timeUnixNano": str(now_unix_nano)}
    requests = [
        {
            **times,
            "asInt": str(n),
            "attributes": _attributes(model=m, version=v, variant=variant, status=status),
        }
        for (m, v, variant, status), n in snapshot.requests.items()
    ]
    metrics: list[dict[str, Any]] = [
        {
            "name": "edgeserve.requests",
            "unit": "{request}",
            "sum": {
                "dataPoints": requests,
                "aggregationTemporality": CUMULATIVE,
                "isMonotonic": True,
            },
        }
    ]
    for i, name in enumerate(HISTOGRAM_NAMES):
        points = [
            {
                **times,
                "count": str(sum(hists[i][0])),
                "sum": hists[i][1],
                "bucketCounts": [str(c) for c in hists[i][0]],
                "explicitBounds": list(LATENCY_BUCKETS),
                "attributes": _attributes(model=m, version=v),
            }
            for (m, v), hists in snapshot.latency.items()
        ]
        metrics.append(
            {
                "name": name,
                "unit": "s",
                "histogram": {"dataPoints": points, "aggregationTemporality": CUMULATIVE},
            }
        )
    return {
        "resourceMetrics": [
            {
                "resource": _resource(data_region, service_instance),
                "scopeMetrics": [{"scope": {"name": "edgeserve.telemetry"}, "metrics": metrics}],
            }
        ]
    }


def export_request(
    rows: list[tuple[str, dict[str, Any]]], data_region: str, service_instance: str
) -> dict[str, Any]:
    return {
        "resourceLogs": [
            {
                "resource": _resource(data_region, service_instance),
                "scopeLogs": [
                    {
                        "scope": {"name": "edgeserve.telemetry"},
                        "logRecords": [log_record(table, row) for table, row in rows],
                    }
                ],
            }
        ]
    }


def encode(request: dict[str, Any], encoding: str) -> tuple[bytes, str]:
    """The body and its content type; protobuf via the official opentelemetry-proto."""
    body = orjson.dumps(request)
    if encoding == "json":
        return body, "application/json"
    from google.protobuf import json_format

    if "resourceMetrics" in request:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest as Message,
        )
    else:
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
            ExportLogsServiceRequest as Message,
        )
    message = json_format.Parse(body, Message())
    return message.SerializeToString(), "application/x-protobuf"
