"""Telemetry rows as OTLP log records (JSON mapping of ExportLogsServiceRequest).

Each record carries `edgeserve.record_id`, stable across retries, so a receiver can
drop duplicates; the resource carries `edgeserve.data_region`.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

SEVERITY_INFO = 9
SEVERITY_WARN = 13
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
    attributes = [{"key": "edgeserve.kind", "value": {"stringValue": table}}]
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


def export_request(
    rows: list[tuple[str, dict[str, Any]]], data_region: str, service_instance: str
) -> dict[str, Any]:
    return {
        "resourceLogs": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": "edgeserve"}},
                        {"key": "service.instance.id", "value": {"stringValue": service_instance}},
                        {"key": "edgeserve.data_region", "value": {"stringValue": data_region}},
                    ]
                },
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
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    message = json_format.Parse(body, ExportLogsServiceRequest())
    return message.SerializeToString(), "application/x-protobuf"
