"""Turn a benchmark run's results into the printed tables (Markdown)."""

from __future__ import annotations

from typing import Any


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
        "| ÷ raw batch 1 | ÷ raw best batch | ÷ peer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target in results["targets"]:
        raw = target.get("raw") or {}
        best = raw.get("best_rows_per_s")
        b1 = raw.get("batch1_rows_per_s")
        lines.append(
            f"| {target['label']} | raw runtime, batch 1 ({raw.get('batch1_plan', '')}) | – | "
            f"{_f(b1)} | {_f(b1)} | {_f(raw.get('batch1_p50_ms'), 3)} | – | – | – | – | – |"
        )
        calls = best / max(1, raw.get("best_batch", 1)) if best else None
        lines.append(
            f"| {target['label']} | raw runtime, best batch {raw.get('best_batch', '–')} "
            f"({raw.get('best_plan', '')}) | – | {_f(calls)} | {_f(best)} | – | – | – | – | – | – |"
        )
        if raw.get("openvino_async"):
            ov = raw["openvino_async"]
            lines.append(
                f"| {target['label']} | raw OpenVINO THROUGHPUT + AsyncInferQueue "
                f"({ov['jobs']} jobs), batch 1 | – | {_f(ov['batch1_rows_per_s'])} "
                f"| {_f(ov['batch1_rows_per_s'])} | – | – | – | – | – | – |"
            )
        peer = {r["connections"]: r for r in target.get("peer", [])}
        for server, runs in target.get("servers", {}).items():
            for r in runs:
                p = peer.get(r["connections"]) if server != "mlserver" else None
                lines.append(
                    f"| {target['label']} | {server} | {r['connections']} | {_f(r['req_per_s'])} | "
                    f"{_f(r['req_per_s'] * target.get('rows_per_request', 1))} | "
                    f"{_f(r['p50_ms'], 2)} | {_f(r['p99_ms'], 2)} | {r['refused'] + r['errors']} | "
                    f"{_ratio(r['req_per_s'] * target.get('rows_per_request', 1), b1)} | "
                    f"{_ratio(r['req_per_s'] * target.get('rows_per_request', 1), best)} | "
                    f"{_ratio(r['req_per_s'], p['req_per_s']) if p else '–'} |"
                )
        for r in target.get("peer", []):
            lines.append(
                f"| {target['label']} | MLServer {results['env'].get('mlserver', '')} | "
                f"{r['connections']} | {_f(r['req_per_s'])} | {_f(r['req_per_s'])} | "
                f"{_f(r['p50_ms'], 2)} | {_f(r['p99_ms'], 2)} | {r['refused'] + r['errors']} | "
                f"{_ratio(r['req_per_s'], b1)} | {_ratio(r['req_per_s'], best)} | 1.00× |"
            )
    return "\n".join(lines)


def overload_table(results: dict[str, Any]) -> str:
    lines = [
        "| model | load | offered | answered/s | accepted | refused 429/503 | errors/hung |"
        " p50 ms | p99 ms (accepted) | p99 ms (refusals) | max RSS MiB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in results.get("overload", []):
        for phase in ("baseline", "overload"):
            r = o.get(phase)
            if not r:
                continue
            p99 = r["ok_p99_ms"] if r.get("ok_p99_ms") else r["p99_ms"]
            lines.append(
                f"| {o['label']} | {phase} | {o[phase + '_offered']} | {_f(r['req_per_s'])} | "
                f"{r['ok']} | {r['refused']} | {r['errors']} | {_f(r['p50_ms'], 2)} | "
                f"{_f(p99, 2)} | {_f(r.get('refused_p99_ms') or None, 2)} | "
                f"{_f(o.get(phase + '_max_rss_mib'), 1)} |"
            )
    return "\n".join(lines)


def render(results: dict[str, Any]) -> str:
    env = results["env"]
    parts = [
        f"Run {env['date']} on {env['cpu']} ({env['cores']} physical cores), "
        f"onnxruntime {env['onnxruntime']}, openvino {env['openvino']}, wrk {env['wrk']}; "
        f"{env['duration_s']} s per point after a warm-up; load generator on the same box.",
        "",
        throughput_table(results),
        "",
        overload_table(results),
        "",
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
