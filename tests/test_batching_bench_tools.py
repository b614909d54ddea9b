"""The benchmark's pure parts (no timings): reading wrk's report, merging model.toml
overrides, merging open-loop samples, and rendering the results tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.loadgen import parse_wrk
from bench.openloop import summarise
from bench.report import render
from bench.servers import _merge_tables
from tests.serving import MODELS

WRK_OUTPUT = """Running 10s test @ http://127.0.0.1:8080
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.51ms    1.02ms  20.11ms   80.00%
  Latency Distribution
     50%    2.21ms
     75%    2.90ms
     90%    3.60ms
     99%  850.00us
  62240 requests in 10.00s, 20.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 17
Requests/sec:   6224.00
Transfer/sec:      2.00MB
"""


def test_wrk_report_is_read_with_units() -> None:
    r = parse_wrk(WRK_OUTPUT, 16, 10)
    assert (r.requests, r.refused, r.ok, r.errors) == (62240, 17, 62223, 3)
    assert r.req_per_s == 6224.0
    assert r.p50_ms == 2.21
    assert r.p99_ms == 0.85


def test_model_toml_overrides_replace_keys_and_add_tables() -> None:
    text = 'backend = "x"\n[batching]\nmax_queue_size = 256\nmax_concurrent_batches = 2\n'
    merged = _merge_tables(
        text, "[batching]\nmax_concurrent_batches = 1\n[threads]\nintra_op_threads = 2\n"
    )
    assert merged.count("max_concurrent_batches") == 1
    assert "max_concurrent_batches = 1" in merged
    assert "max_queue_size = 256" in merged
    assert merged.rstrip().endswith("[threads]\nintra_op_threads = 2")


def test_open_loop_samples_merge_into_rates_and_accepted_refused_percentiles() -> None:
    worker = {"scheduled": 500, "sent": 480, "hung": 20, "sending_s": 10.0, "cpu_s": 2.0}
    summaries = [dict(worker, connections=64), dict(worker, connections=64, sending_s=8.0)]
    statuses = np.array([200] * 100 + [429] * 800 + [503] * 50 + [500] * 10, np.int16)
    latencies = np.concatenate(
        [np.full(100, 0.010), np.full(800, 0.001), np.full(50, 0.002), np.full(10, 0.5)]
    )
    from_send = latencies - np.concatenate([np.full(100, 0.004), np.zeros(860)])
    r = summarise(100.0, 10.0, 5.0, summaries, statuses, latencies, np.zeros(960), from_send)
    assert (r.scheduled, r.sent, r.ok, r.refused, r.errors, r.hung) == (1000, 960, 100, 850, 10, 40)
    assert r.achieved_rate == 96.0  # sent over the longest worker's sending time
    assert (r.ok_per_s, r.refused_per_s) == (10.0, 85.0)
    assert round(r.ok_p99_ms, 6) == 10.0 and round(r.refused_p50_ms, 6) == 1.0
    assert round(r.ok_from_send_p99_ms, 6) == 6.0  # the 4 ms each waited to be sent left out
    assert r.client_cpu_cores == 0.4
    assert r.statuses == {"200": 100, "429": 800, "500": 10, "503": 50}


def test_overload_table_shows_offered_accepted_refused_and_ratio_to_unloaded() -> None:
    def phase(rate: float, ok_p99: float, refused: float) -> dict:
        return {
            "target_rate": rate,
            "achieved_rate": rate * 0.99,
            "ok_per_s": 3800.0,
            "refused_per_s": refused,
            "errors": 0,
            "hung": 0,
            "ok_p50_ms": 1.0,
            "ok_p99_ms": ok_p99,
            "ok_from_send_p99_ms": ok_p99 - 1.0,
            "refused_p99_ms": 2.0 if refused else float("nan"),
            "send_lag_p99_ms": 1.5,
            "client_cpu_cores": 0.6,
        }

    overload = {
        "label": "digits",
        "capacity_req_per_s": 3800.0,
        "baseline": phase(1900.0, 5.0, 0.0),
        "baseline_factor": 0.5,
        "overload": phase(15200.0, 12.5, 11000.0),
        "overload_factor": 4.0,
        "overload_max_rss_mib": 190.0,
        "overload_rss_first_5s_mib": 189.0,
        "overload_rss_last_5s_mib": 186.0,
        "overload_load_avg": 2.5,
    }
    text = render({"env": ENV, "targets": [], "overload": [overload]})
    row = next(line for line in text.splitlines() if line.startswith("| digits | overload"))
    assert "(4× of 3,800) | 15,200 / 15,048 | 3,800 | 11,000 | 0 / 0 |" in row
    assert "| 12.50 | 2.50× | 11.50 | 2.00 |" in row
    assert row.endswith("| 190.0 | 189 / 186 | 2.50 |")
    header = next(line for line in text.splitlines() if line.startswith("| model | phase"))
    assert header.count("|") == row.count("|")


ENV = {
    "date": "d",
    "cpu": "c",
    "cores": 2,
    "onnxruntime": "1",
    "openvino": "2",
    "wrk": "4",
    "mlserver": "1.7.1",
    "duration_s": 10,
}


def test_report_renders_ratios_against_raw_and_peer() -> None:
    run = {
        "connections": 16,
        "req_per_s": 3000.0,
        "p50_ms": 2.0,
        "p99_ms": 9.0,
        "refused": 0,
        "errors": 0,
    }
    results = {
        "env": ENV,
        "targets": [
            {
                "label": "digits",
                "raw": {
                    "batch1_rows_per_s": 6000.0,
                    "best_rows_per_s": 60000.0,
                    "best_batch": 64,
                    "best_plan": "1x2",
                    "best_sweep_rows_per_s": 63000.0,
                    "best_reruns_rows_per_s": [59000.0, 60000.0, 61000.0],
                },
                "servers": {
                    "edgeserve (uvicorn)": [run],
                    "bracketed": [dict(run, raw_alongside_rows_per_s=[5000.0, 7000.0])],
                    "half-bracketed": [dict(run, raw_alongside_rows_per_s=[4000.0, None])],
                },
                "peer": [dict(run, req_per_s=1000.0)],
            }
        ],
        "overload": [],
    }
    text = render(results)
    row = next(line for line in text.splitlines() if "edgeserve (uvicorn)" in line)
    assert "| 0.50× | 0.050× | – | 3.00× |" in row
    bracketed = next(line for line in text.splitlines() if "| bracketed" in line)
    assert "| 0.50× | 0.050× | 0.50× | 3.00× |" in bracketed  # 3,000 over the mean 6,000
    half = next(line for line in text.splitlines() if "| half-bracketed" in line)
    assert "| 0.050× | 0.75× | 3.00× |" in half  # the one measured side
    assert "best batch 64 (1x2, median of 3 reruns; sweep 63,000) | – | 938 | 60,000 |" in text
    assert all(line.count("|") == 13 for line in text.splitlines() if line.startswith("| digits"))


def digits_raw_spec(tmp_path: Path) -> dict:
    """A bench.raw spec for digits v2 on ONNX Runtime, 64 held-out rows, short runs."""
    inputs = tmp_path / "rows.npz"
    np.savez(inputs, input=np.load(MODELS / "digits" / "heldout.npz")["X"][:64])
    return {
        "model_dir": str(MODELS / "digits"),
        "version": 2,
        "backend": "onnxruntime",
        "inputs": str(inputs),
        "cores": 2,
        "duration_s": 0.02,
    }


def test_a_raw_point_is_measured_once_for_its_plan_and_batch(tmp_path: Path) -> None:
    from bench.raw import measure_point

    spec = dict(digits_raw_spec(tmp_path), point={"plan": "2x1", "batch": 8})
    result = measure_point(spec)
    assert list(result) == ["rows_per_s"] and result["rows_per_s"] > 0


def test_raw_reference_is_the_best_median_of_reruns_of_the_sweeps_best_points(
    tmp_path: Path,
) -> None:
    import statistics

    from bench.raw import BEST_CANDIDATES, BEST_RERUNS, measure

    result = measure(digits_raw_spec(tmp_path))
    sweep = {
        (f"{p['executor']}x{p['intra']}", b): r
        for p in result["plans"]
        for b, r in p["rows_per_s"].items()
    }
    top = sorted(sweep.values(), reverse=True)[:BEST_CANDIDATES]
    candidates = result["candidates"]
    assert [c["sweep"] for c in candidates] == top
    assert all(len(c["reruns"]) == BEST_RERUNS for c in candidates)
    medians = [statistics.median(c["reruns"]) for c in candidates]
    assert result["best_rows_per_s"] == max(medians)
    chosen = candidates[medians.index(max(medians))]
    assert (result["best_plan"], result["best_batch"]) == (chosen["plan"], chosen["batch"])
    assert result["best_sweep_rows_per_s"] == sweep[(chosen["plan"], chosen["batch"])]
