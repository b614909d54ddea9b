"""Prometheus alert rules and the Grafana dashboard: valid PromQL (promtool, from Debian's
`prometheus` package, which .ci/run installs), alert unit tests, and every metric they
use is one a real server exports on /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import RunningServer

yaml = pytest.importorskip("yaml", reason="PyYAML not installed (dev extra)")

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "packaging" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "packaging" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "edgeserve.json"
NOT_OURS = {"up"}  # Prometheus' own series

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not installed (Debian package: prometheus)",
)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    """Each panel query with Grafana's variables replaced by what they expand to."""
    exprs = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    return [
        e.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$model", ".*")
        for e in exprs
    ]


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(edgeserve_[a-z_]+|up)\b(?=\s*[{\[)]|\s*[=<>!]|\s*$)", expr))
    return names - NOT_OURS


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


# --- alert rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_every_alert_has_a_severity_and_a_summary(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"page", "warning"}
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


# --- dashboard -----------------------------------------------------------------------------


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    taken: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        cells = {(g["y"] + dy, g["x"] + dx) for dy in range(g["h"]) for dx in range(g["w"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells


def test_dashboard_queries_use_the_datasource_variable() -> None:
    variables = {v["name"] for v in dashboard()["templating"]["list"]}
    assert {"datasource", "instance", "model"} <= variables
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]


def test_dashboard_covers_the_operator_metrics() -> None:
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    for name in (
        "edgeserve_requests_total",
        "edgeserve_requests_shed_total",
        "edgeserve_request_duration_seconds_bucket",
        "edgeserve_queue_duration_seconds_bucket",
        "edgeserve_batch_size_sum",
        "edgeserve_queue_depth",
        "edgeserve_telemetry_dropped_total",
        "edgeserve_telemetry_backlog_records",
        "edgeserve_sync_lag_seconds",
        "edgeserve_update_rollbacks_total",
        "edgeserve_process_resident_memory_bytes",
    ):
        assert name in used, name


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule."""
    recording = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": expr}
                    for i, expr in enumerate(dashboard_exprs())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(recording))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- against a real server -----------------------------------------------------------------


@pytest.fixture(scope="module")
def exported_series(server: RunningServer) -> Iterator[set[str]]:
    """Series names a real server exports, with the suffixes Prometheus stores."""
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0] * 64}]}
    httpx.post(f"{server.url}/v2/models/digits/infer", json=body, timeout=30).raise_for_status()
    scraped = httpx.get(f"{server.url}/metrics", timeout=30)
    scraped.raise_for_status()
    names: set[str] = set()
    for family in text_string_to_metric_families(scraped.text):
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    yield names


@pytest.mark.slow
def test_alert_rules_use_only_exported_metrics(exported_series: set[str]) -> None:
    for rule in rules():
        missing = metric_names(rule["expr"]) - exported_series
        assert not missing, f"{rule['alert']} uses {missing}"


@pytest.mark.slow
def test_dashboard_uses_only_exported_metrics(exported_series: set[str]) -> None:
    for expr in dashboard_exprs():
        missing = metric_names(expr) - exported_series
        assert not missing, f"{expr} uses {missing}"


@pytest.mark.slow
def test_event_counters_are_exported_at_zero_before_the_first_event(server: RunningServer) -> None:
    """increase() sees the first rollback or drop only on a series that was there before."""
    scraped = httpx.get(f"{server.url}/metrics", timeout=30)
    scraped.raise_for_status()
    samples = [
        s
        for family in text_string_to_metric_families(scraped.text)
        for s in family.samples
        if s.name in ("edgeserve_update_rollbacks_total", "edgeserve_telemetry_dropped_total")
    ]
    rollbacks = {
        (s.labels["model"], s.labels["reason"]): s.value
        for s in samples
        if s.name == "edgeserve_update_rollbacks_total"
    }
    assert rollbacks == {("digits", "health_watch"): 0.0, ("digits", "manual"): 0.0}
    drops = {
        (s.labels["table"], s.labels["reason"]): s.value
        for s in samples
        if s.name == "edgeserve_telemetry_dropped_total"
    }
    assert drops[("inferences", "queue_full")] == 0.0
    assert drops[("audit", "write_error")] == 0.0


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("health watch: error rate 0.31 over 0.05", "health_watch"),
        ("operator: bad release 2026-12-07, ticket #4711", "manual"),
        ("", "manual"),
    ],
)
def test_the_rollback_reason_label_is_an_enum(text: str, label: str) -> None:
    from edgeserve.telemetry.metrics import ROLLBACK_REASONS, rollback_reason

    assert rollback_reason(text) == label and label in ROLLBACK_REASONS


# --- a real Prometheus scraping a real server -----------------------------------------------

SCRAPE_CONFIG = ROOT / "packaging" / "prometheus" / "scrape-config.yml"
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="prometheus not installed (Debian package: prometheus)",
)


def _scrape_job_for(target: str, token_file: Path) -> dict[str, Any]:
    """The shipped job, pointed at one loopback target instead of Kubernetes discovery
    (Debian's Prometheus is built without it); auth and paths are the shipped ones."""
    job = yaml.safe_load(SCRAPE_CONFIG.read_text())["scrape_configs"][0]
    assert job["job_name"] == "edgeserve" and "kubernetes_sd_configs" in job
    del job["kubernetes_sd_configs"], job["relabel_configs"]
    job["static_configs"] = [{"targets": [target]}]
    job["authorization"]["credentials_file"] = str(token_file)
    job["scrape_interval"] = "1s"
    return job


@pytest.mark.slow
@needs_prometheus
def test_the_scrape_config_scrapes_a_real_server_with_its_token(tmp_path: Path) -> None:
    from tests.k8s_pods import Cluster
    from tests.serving import free_port, stop
    from tests.waiting import wait_until

    cluster = Cluster(tmp_path / "cluster")
    token = tmp_path / "token"
    token.write_text(cluster.token("metrics", subject="prometheus") + "\n")
    with cluster.pod("pod-0") as pod:
        config = tmp_path / "prometheus.yml"
        job = _scrape_job_for(f"127.0.0.1:{pod.port}", token)
        config.write_text(
            yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [job]})
        )
        checked = promtool("check", "config", str(config))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        port = free_port()  # prometheus takes its listen address on its command line
        log = (tmp_path / "prometheus.log").open("wb")
        prometheus = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:

            def scraped() -> dict[str, Any] | None:
                try:
                    reply = httpx.get(f"http://127.0.0.1:{port}/api/v1/targets", timeout=2)
                except httpx.TransportError:
                    return None
                if reply.status_code != 200:  # 503 "Service Unavailable" while it starts
                    return None
                targets = reply.json()["data"]["activeTargets"]
                done = [t for t in targets if t["health"] != "unknown"]
                return done[0] if done else None

            target = wait_until(scraped, timeout_s=60, what="Prometheus' first scrape")
            assert target["health"] == "up", target["lastError"]
            assert target["labels"]["job"] == "edgeserve"  # what alerts.yml selects
            query = httpx.get(
                f"http://127.0.0.1:{port}/api/v1/query",
                params={"query": 'up{job="edgeserve"} * on(instance) edgeserve_models_loaded'},
                timeout=5,
            ).json()
            assert float(query["data"]["result"][0]["value"][1]) >= 1  # up, and serving
        finally:
            stop(prometheus)
            log.close()


@needs_promtool
def test_the_alerts_job_selector_can_be_changed(tmp_path: Path) -> None:
    script = ROOT / "packaging" / "prometheus" / "alerts-for-job.sh"
    done = subprocess.run(
        [str(script), 'job="kubernetes-pods",namespace="ml"'],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert 'job="edgeserve"' not in done.stdout
    assert 'up{job="kubernetes-pods",namespace="ml"}' in done.stdout
    rendered = tmp_path / "alerts.yml"
    rendered.write_text(done.stdout)
    result = promtool("check", "rules", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr
    refused = subprocess.run([str(script), "a|b"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2


def test_the_alerts_job_script_is_shellcheck_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (Debian package: shellcheck)")
    script = ROOT / "packaging" / "prometheus" / "alerts-for-job.sh"
    done = subprocess.run(["shellcheck", "--shell=sh", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout
