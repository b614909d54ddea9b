"""Turn a benchmark run's results into the printed tables (Markdown)."""

from __future__ import annotations

from typing import Any

from bench.headline import alongside_mean, headline_table


def _f(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b or a != a or b != b:
        return "–"
    r = a / b
    return f"{r:.3f}×" if r < 0.1 else f"{r:.2f}×"


def throughput_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | server | conns | req/s | rows/s | p50 ms | p99 ms | errors "
        "| ÷ raw batch 1 | ÷ raw best batch | ÷ raw alongside | ÷ peer | loop µs/req |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in results["targets"]:
        raw = target.get("raw") or {}
        best = raw.get("best_rows_per_s")
        b1 = raw.get("batch1_rows_per_s")
        if raw:  # `--only shipped` reads the small model against the peer and floor only
            lines.append(
                f"| {target['label']} | raw runtime, batch 1 ({raw.get('batch1_plan', '')}) | – "
                f"| {_f(b1)} | {_f(b1)} | {_f(raw.get('batch1_p50_ms'), 3)} "
                "| – | – | – | – | – | – | – |"
            )
            calls = best / max(1, raw.get("best_batch", 1)) if best else None
            how = raw.get("best_plan", "")
            if raw.get("best_reruns_rows_per_s"):
                how += (
                    f", median of {len(raw['best_reruns_rows_per_s'])} reruns;"
                    f" sweep {_f(raw.get('best_sweep_rows_per_s'))}"
                )
            lines.append(
                f"| {target['label']} | raw runtime, best batch {raw.get('best_batch', '–')} "
                f"({how}) | – | {_f(calls)} | {_f(best)} | – | – | – | – | – | – | – | – |"
            )
        if raw.get("openvino_async"):
            ov = raw["openvino_async"]
            lines.append(
                f"| {target['label']} | raw OpenVINO THROUGHPUT + AsyncInferQueue "
                f"({ov['jobs']} jobs), batch 1 | – | {_f(ov['batch1_rows_per_s'])} "
                f"| {_f(ov['batch1_rows_per_s'])} | – | – | – | – | – | – | – | – |"
            )
        peer = {r["connections"]: r for r in target.get("peer", [])}
        for server, runs in target.get("servers", {}).items():
            for r in runs:
                p = peer.get(r["connections"]) if server != "mlserver" else None
                rows = r["req_per_s"] * target.get("rows_per_request", 1)
                lines.append(
                    f"| {target['label']} | {server} | {r['connections']} | {_f(r['req_per_s'])} | "
                    f"{_f(rows)} | "
                    f"{_f(r['p50_ms'], 2)} | {_f(r['p99_ms'], 2)} | {r['refused'] + r['errors']} | "
                    f"{_ratio(rows, b1)} | {_ratio(rows, best)} | "
                    f"{_ratio(rows, alongside_mean(r))} | "
                    f"{_ratio(r['req_per_s'], p['req_per_s']) if p else '–'} | "
                    f"{_f(r.get('loop_us_per_request'))} |"
                )
        for r in target.get("peer", []):
            lines.append(
                f"| {target['label']} | MLServer {results['env'].get('mlserver', '')} | "
                f"{r['connections']} | {_f(r['req_per_s'])} | {_f(r['req_per_s'])} | "
                f"{_f(r['p50_ms'], 2)} | {_f(r['p99_ms'], 2)} | {r['refused'] + r['errors']} | "
                f"{_ratio(r['req_per_s'], b1)} | {_ratio(r['req_per_s'], best)} | "
                f"{_ratio(r['req_per_s'], alongside_mean(r))} | 1.00× | – |"
            )
    return "\n".join(lines)


def overload_table(results: dict[str, Any]) -> str:
    """Open-loop phases: what was offered and sent, what was accepted or refused, how fast."""
    lines = [
        "| model | phase | offered req/s (target / achieved) | accepted/s | refused/s "
        "| errors / hung | accepted p50 ms | accepted p99 ms | ÷ unloaded p99 "
        "| accepted p99 from send ms | refusal p99 ms | send lag p99 ms | client CPU cores "
        "| max RSS MiB "
        "| RSS first / last 5 s | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in results.get("overload", []):
        unloaded = (o.get("baseline") or {}).get("ok_p99_ms")
        for phase in ("baseline", "overload"):
            r = o.get(phase)
            if not r:
                continue
            factor = o.get(phase + "_factor")
            name = (
                f"{phase} ({factor:g}× of {_f(o.get('capacity_req_per_s'))})" if factor else phase
            )
            lines.append(
                f"| {o['label']} | {name} | {_f(r['target_rate'])} / {_f(r['achieved_rate'])} | "
                f"{_f(r['ok_per_s'])} | {_f(r['refused_per_s'])} | {r['errors']} / {r['hung']} | "
                f"{_f(r['ok_p50_ms'], 2)} | {_f(r['ok_p99_ms'], 2)} | "
                f"{_ratio(r['ok_p99_ms'], unloaded) if phase == 'overload' else '–'} | "
                f"{_f(r.get('ok_from_send_p99_ms'), 2)} | "
                f"{_f(r['refused_p99_ms'], 2)} | {_f(r['send_lag_p99_ms'], 2)} | "
                f"{_f(r['client_cpu_cores'], 2)} | {_f(o.get(phase + '_max_rss_mib'), 1)} | "
                f"{_f(o.get(phase + '_rss_first_5s_mib'))} / "
                f"{_f(o.get(phase + '_rss_last_5s_mib'))} | "
                f"{_f(o.get(phase + '_load_avg'), 2)} |"
            )
    if len(lines) > 2:
        lines.append("")
        lines.append(
            "Open loop (bench/openloop.py): requests leave on a fixed schedule; latency counts "
            "from each request's slot; hung = no answer within the timeout; the client runs on "
            "the same 2 cores as the server (its CPU use is in the table)."
        )
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    env = results["env"]
    parts = [
        f"Run {env['date']} on {env['cpu']} ({env['cores']} physical cores), "
        f"onnxruntime {env['onnxruntime']}, openvino {env['openvino']}, wrk {env['wrk']}; "
        f"{env['duration_s']} s per point after a warm-up; load generator on the same box. "
        "edgeserve rows are the shipped configuration (auth on, a bearer token on every "
        "request, telemetry on) unless the label names a departure; the floor and MLServer "
        "run without auth. loop µs/req: the event-loop thread's CPU per request at the "
        "busiest point (/proc/<pid>/task/<tid>/stat).",
        "",
        *([headline, ""] if (headline := headline_table(results)) else []),
        throughput_table(results),
        "",
        *([overload_table(results), ""] if results.get("overload") else []),
    ]
    s = results.get("startup")
    if s:
        parts.append(
            f"Start to ready ({', '.join(s['models'])}, {s['engine']}): {s['ready_s']:.2f} s; "
            f"idle RSS with these models loaded: {s['idle_rss_mib']:.1f} MiB."
        )
    for note in results.get("notes", []):
        parts.append(f"- {note}")
    return "\n".join(parts) + "\n"
