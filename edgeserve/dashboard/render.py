"""The dashboard page as HTML: models, live traffic, experiments with their statistics,
flags. Every value is escaped; there is no inline script or style (strict CSP)."""

from __future__ import annotations

from html import escape
from typing import Any

from edgeserve.dashboard.charts import bar_chart, interval_chart, sparkline

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}">
<title>edgeserve dashboard</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard/static/dashboard.css"></head>
<body><h1>edgeserve</h1>
<form method="post" action="/dashboard/logout"><button type="submit">Sign out</button></form>
{body}
</body></html>"""

LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeserve dashboard</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/dashboard/static/dashboard.css"></head>
<body><h1>edgeserve</h1>
<p>{message}</p>
<form method="post" action="/dashboard/session">
<label for="token">Access token with the <code>read</code> scope</label><br>
<input id="token" name="token" type="password" autocomplete="off" required>
<button type="submit">Open the dashboard</button></form>
<p class="muted">Mint one on the box: <code>edgeserve token create --scope read</code>.
The token is kept in a cookie for this browser session only.</p>
</body></html>"""


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return escape(str(value))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def models_section(models: list[dict[str, Any]]) -> str:
    rows = []
    for m in models:
        for v in m["versions"]:
            mark = "ok" if v["state"] == "READY" else "bad"
            rows.append(
                [
                    escape(m["name"]),
                    escape(str(v["version"])),
                    f'<span class="{mark}">{escape(v["state"])}</span>',
                    "yes" if v["version"] == m["default"] else "",
                    escape(v.get("backend") or ""),
                    escape(v.get("reason") or ""),
                ]
            )
    return "<h2>Models</h2>" + _table(
        ["model", "version", "state", "default", "backend", "note"], rows
    )


def traffic_section(traffic: dict[str, Any]) -> str:
    rows = [
        [
            escape(name),
            _num(t["requests_per_s"]),
            _num(t["p50_ms"]),
            _num(t["p99_ms"]),
            _num(t["error_rate"]),
        ]
        for name, t in sorted(traffic["models"].items())
    ]
    return (
        "<h2>Live traffic (last 5 minutes)</h2>"
        + sparkline(traffic["per_10s"], title="requests per 10 seconds, last 10 minutes")
        + _table(["model", "requests/s", "p50 ms", "p99 ms", "error rate"], rows)
    )


def experiment_section(report: dict[str, Any]) -> str:
    exp = report["experiment"]
    decision = report["decision"]
    srm = report["sample_ratio_mismatch"]
    srm_text = (
        ("not applicable (shadow)" if exp["mode"] == "shadow" else "no units in this window yet")
        if srm is None
        else f'<span class="bad">mismatch, p={srm["p_value"]:.2g}</span>'
        if srm["mismatch"]
        else f'<span class="ok">ok, p={srm["p_value"]:.2g}</span>'
    )
    variants = [
        [
            escape(v["name"]),
            escape(str(v["version"])),
            _num(v["weight"]),
            _num(v["requests"]),
            _num(v["error_rate"]),
            _num(v["latency_ms"]["p50"]),
            _num(v["latency_ms"]["p95"]),
            _num(v["latency_ms"]["p99"]),
            _num(v["mean_confidence"]),
            _num(v["labelled"]),
            _num(v["accuracy"]),
            _num(v["kpi_mean"]),
        ]
        for v in report["variants"]
    ]
    comparisons = []
    intervals = []
    for c in report["comparisons"]:
        seq, fixed = c["sequential"], c["fixed_horizon"]
        comparisons.append(
            [
                escape(c["variant"]),
                escape(c["metric"]),
                escape(c["kind"]),
                _num(seq["difference"]),
                f"[{_num(seq['confidence_sequence']['low'])}, "
                f"{_num(seq['confidence_sequence']['high'])}]",
                _num(seq["always_valid_p_value"]),
                _num(fixed["p_value"]),
                _num(fixed["holm_adjusted_p_value"]),
                "yes" if seq["significant"] else "no",
            ]
        )
        intervals.append(
            (
                f"{c['variant']} {c['metric']}",
                seq["difference"],
                seq["confidence_sequence"]["low"],
                seq["confidence_sequence"]["high"],
                c["better_when"],
            )
        )
    return (
        f'<h2>Experiment {escape(exp["id"])} <span class="muted">({escape(exp["model"])}, '
        f"{escape(exp['mode'])}, {escape(exp['status'])})</span></h2>"
        f'<p class="decision">{"Outcome" if decision.get("recorded") else "Decision"}: '
        f"{escape(decision['action'])} — {escape(decision['reason'])}</p>"
        f"<p>Sample ratio check (units): {srm_text}. Primary metric: "
        f"{escape(exp['primary_metric'])}.</p>"
        + _extras(report)
        + bar_chart(
            [(v["name"], float(v["requests"])) for v in report["variants"]],
            title="requests per variant",
            unit=" req",
        )
        + _table(
            [
                "variant",
                "version",
                "weight",
                "requests",
                "error rate",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "mean confidence",
                "labelled",
                "accuracy",
                "KPI mean",
            ],
            variants,
        )
        + "<h3>Differences (candidate − control), 95% always-valid intervals, "
        "each on its own scale</h3>"
        + (
            interval_chart(intervals, title="difference with confidence sequence")
            if intervals
            else '<p class="muted">Not enough data yet.</p>'
        )
        + _table(
            [
                "variant",
                "metric",
                "kind",
                "difference",
                "confidence sequence",
                "always-valid p",
                "fixed-horizon p",
                "Holm-adjusted p",
                "significant",
            ],
            comparisons,
        )
    )


def _extras(report: dict[str, Any]) -> str:
    """The shadow agreement and CUPED lines, when the report has them."""
    out = ""
    agreement = report.get("shadow_agreement")
    if agreement:
        ci = agreement["agreement_ci"]
        out += (
            f"<p>Shadow agreement: {_num(agreement['agreement_rate'])} "
            f"[{_num(ci['low'])}, {_num(ci['high'])}] over {_num(agreement['pairs'])} "
            f"requests from {_num(agreement['units'])} units; mean |top score difference| "
            f"{_num(agreement['mean_abs_top_score_difference'])}.</p>"
        )
    adjusted = report.get("cuped")
    if adjusted:
        out += (
            f"<p>CUPED: variance reduced by {_num(adjusted['variance_reduction'])} "
            f"(pre-period correlation {_num(adjusted['correlation'])}).</p>"
        )
    return out


def drift_section(checks: list[dict[str, Any]]) -> str:
    """Prediction drift per model version against its first requests."""
    if not checks:
        return ""
    rows = [
        [
            escape(c["model"]),
            escape(c["version"]),
            '<span class="bad">drifted</span>'
            if c["drifted"]
            else '<span class="ok">stable</span>',
            _num(c["psi_classes"]),
            _num(c["psi_top_score"]),
            _num(c["chi_square_p"]),
            f"{_num(c['live'])} vs {_num(c['baseline'])}",
        ]
        for c in checks
    ]
    headers = ["model", "version", "predictions", "class PSI", "top-score PSI", "p"]
    return "<h2>Prediction drift</h2>" + _table([*headers, "live vs baseline requests"], rows)


def flags_section(flags: list[dict[str, Any]]) -> str:
    rows = [
        [
            escape(f["name"]),
            '<span class="ok">on</span>' if f["enabled"] else '<span class="bad">off</span>',
            _num(f["rollout_percent"]),
        ]
        for f in flags
    ]
    return "<h2>Flags</h2>" + (
        _table(["flag", "state", "rollout %"], rows) if rows else '<p class="muted">No flags.</p>'
    )


def page(
    models: list[dict[str, Any]],
    traffic: dict[str, Any],
    reports: list[dict[str, Any]],
    flags: list[dict[str, Any]],
    drift: list[dict[str, Any]] | None = None,
    refresh_s: int = 10,
) -> str:
    body = (
        models_section(models)
        + traffic_section(traffic)
        + drift_section(drift or [])
        + (
            "".join(experiment_section(r) for r in reports)
            or '<h2>Experiments</h2><p class="muted">No experiments.</p>'
        )
        + flags_section(flags)
    )
    return PAGE.format(refresh=refresh_s, body=body)


def login(message: str = "") -> str:
    return LOGIN.format(message=escape(message))
