"""The [telemetry] section of edgeserve.toml: local buffer, upstream sync, alerts."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from edgeserve.config.schema import ConfigError, setting


@dataclass(frozen=True)
class UpstreamSettings:
    """Where telemetry goes when the box is connected (OTLP/HTTP)."""

    url: str = ""  # e.g. https://collector.example/v1/logs ; empty = keep everything local
    allowed_hosts: list[str] = setting([])  # the upstream host must be listed (residency)
    encoding: str = setting("json", choices=("json", "protobuf"))
    compression: str = setting("gzip", choices=("gzip", "none"))  # OTLP/HTTP Content-Encoding
    bearer_token_file: str = ""
    client_cert: str = ""  # mutual TLS: PEM certificate and key files
    client_key: str = ""
    ca_file: str = ""  # a private CA for the collector's certificate
    batch_records: int = setting(500, min=1, max=10000)
    timeout_s: float = setting(10.0, min=0.1, max=300.0)
    backoff_initial_s: float = setting(1.0, min=0.01, max=600.0)
    backoff_max_s: float = setting(300.0, min=0.1, max=86400.0)
    breaker_failures: int = setting(5, min=1, max=1000)
    breaker_open_s: float = setting(60.0, min=0.1, max=86400.0)
    # A collector's Retry-After is honoured up to this, even beyond backoff_max_s.
    retry_after_max_s: float = setting(3600.0, min=1.0, max=86400.0)
    # Upload pace, whichever bound is tighter: a fleet reconnecting after an outage must
    # not flatten the collector, nor a box its own uplink (bytes as sent, compressed).
    catch_up_records_per_s: float = setting(2000.0, min=1.0, max=1_000_000.0)
    catch_up_bytes_per_s: float = setting(1024.0 * 1024.0, min=1024.0, max=1e10)
    # Records the collector refused for good (400/413/422), kept for inspection.
    dead_letter_max_records: int = setting(10_000, min=1, max=1_000_000)
    metrics_interval_s: float = setting(60.0, min=0.0, max=86400.0)  # 0 = no OTLP metrics
    metrics_url: str = ""  # default: `url` with /v1/logs replaced by /v1/metrics

    def __post_init__(self) -> None:
        if not self.url:
            return
        _check_url("telemetry.upstream.url", self.url, self.allowed_hosts)
        if self.metrics_url:
            _check_url("telemetry.upstream.metrics_url", self.metrics_url, self.allowed_hosts)

    def metrics_endpoint(self) -> str:
        """Where aggregates go: `metrics_url`, else the logs URL's sibling /v1/metrics."""
        if self.metrics_url:
            return self.metrics_url
        base = self.url.removesuffix("/v1/logs").rstrip("/")
        return f"{base}/v1/metrics"


def _check_url(key: str, url: str, allowed_hosts: list[str]) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(key, "must be an http(s) URL")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(key, "plain http only to a loopback address")
    if parts.hostname not in allowed_hosts:
        raise ConfigError(
            key, f"host {parts.hostname!r} is not in telemetry.upstream.allowed_hosts"
        )


@dataclass(frozen=True)
class AlertSettings:
    """In-process alert rules; a firing alert is stored, exported and synced."""

    p99_latency_ms: float = setting(0.0, min=0.0)  # 0 = off
    error_rate: float = setting(0.0, min=0.0, max=1.0)  # 0 = off
    queue_saturation: float = setting(0.9, min=0.0, max=1.0)  # share of max_queue_size
    backlog_age_s: float = setting(86400.0, min=0.0)  # oldest unsynced record; 0 = off
    window_s: float = setting(60.0, min=1.0, max=86400.0)
    for_s: float = setting(0.0, min=0.0, max=86400.0)  # a rule must hold this long to fire
    evaluate_interval_s: float = setting(5.0, min=0.1, max=3600.0)
    webhook_url: str = ""  # POSTed on firing; its host must be in upstream.allowed_hosts


@dataclass(frozen=True)
class RetentionSettings:
    """How long rows of each table are kept, synced or not (unsynced ones are counted)."""

    inferences_days: float = setting(30.0, min=0.01, max=3650.0)
    feedback_days: float = setting(90.0, min=0.01, max=3650.0)
    events_days: float = setting(90.0, min=0.01, max=3650.0)
    alerts_days: float = setting(90.0, min=0.01, max=3650.0)
    forget_requests_days: float = setting(365.0, min=0.01, max=3650.0)
    audit_days: float = setting(365.0, min=0.01, max=3650.0)
    payloads_days: float = setting(7.0, min=0.01, max=3650.0)

    def max_age_s(self) -> dict[str, float]:
        return {
            "inferences": self.inferences_days * 86400,
            "feedback": self.feedback_days * 86400,
            "events": self.events_days * 86400,
            "alerts": self.alerts_days * 86400,
            "forget_requests": self.forget_requests_days * 86400,
            "audit": self.audit_days * 86400,
            "payloads": self.payloads_days * 86400,
        }


@dataclass(frozen=True)
class TelemetrySettings:
    """Every inference leaves a record in a local SQLite buffer until upstream has it."""

    enabled: bool = True
    data_region: str = "ae"  # tagged on every record (UAE by default)
    queue_records: int = setting(100_000, min=100, max=10_000_000)
    write_batch_records: int = setting(2000, min=1, max=100_000)
    write_interval_ms: float = setting(100.0, min=1.0, max=60_000.0)
    max_db_bytes: int = setting(512 * 1024 * 1024, min=1024 * 1024)
    maintenance_interval_s: float = setting(30.0, min=0.1, max=3600.0)
    subject_header: str = "x-user-id"  # a caller's unit id, stored only as a keyed hash
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)

    def __post_init__(self) -> None:
        # Header names are case-insensitive and arrive lower-cased (ASGI, gRPC metadata):
        # the name is lower-cased once here, not looked up lower-cased per request.
        object.__setattr__(self, "subject_header", self.subject_header.lower())
        hook = self.alerts.webhook_url
        if hook:
            host = urllib.parse.urlsplit(hook).hostname
            if host not in self.upstream.allowed_hosts:
                raise ConfigError(
                    "telemetry.alerts.webhook_url",
                    f"host {host!r} is not in telemetry.upstream.allowed_hosts",
                )
