"""The benchmark's pure parts (no timings): reading wrk's report, merging model.toml
overrides, and rendering a results table."""

from __future__ import annotations

from bench.loadgen import parse_wrk
from bench.report import render
from bench.servers import _merge_tables

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
        "env": {
            "date": "d",
            "cpu": "c",
            "cores": 2,
            "onnxruntime": "1",
            "openvino": "2",
            "wrk": "4",
            "mlserver": "1.7.1",
            "duration_s": 10,
        },
        "targets": [
            {
                "label": "digits",
                "raw": {"batch1_rows_per_s": 6000.0, "best_rows_per_s": 60000.0, "best_batch": 64},
                "servers": {"edgeserve (uvicorn)": [run]},
                "peer": [dict(run, req_per_s=1000.0)],
            }
        ],
        "overload": [],
    }
    text = render(results)
    row = next(line for line in text.splitlines() if "edgeserve (uvicorn)" in line)
    assert "| 0.50× | 0.050× | 3.00× |" in row
    assert all(line.count("|") == 12 for line in text.splitlines() if line.startswith("| digits"))
