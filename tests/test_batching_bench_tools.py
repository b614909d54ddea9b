"""The benchmark's pure parts (no timings): reading wrk's report, merging model.toml
overrides, merging open-loop samples, rendering the results tables and issue 17's
figures, per-thread CPU from /proc; and that the server it measures by default is the
shipped configuration, answering a real token."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench import heavyratio, loadgen, servers, workload
from bench.headline import figures
from bench.loadgen import parse_wrk, wrk_lua
from bench.openloop import summarise
from bench.report import render
from bench.run import Target, check_answers, headline_targets, setups
from bench.servers import (
    AUTH_OFF,
    SHIPPED,
    TELEMETRY_OFF,
    Variant,
    _merge_tables,
    edgeserve_config,
    write_repository,
)
from bench.threadcpu import ThreadCpu, named_us_per_request, parse_stat, per_request_us, sample
from edgeserve.config.loader import load_settings
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
    assert all(line.count("|") == 14 for line in text.splitlines() if line.startswith("| digits |"))


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


# -- the shipped configuration and issue 17's figures ---------------------------------


def _target(label: str, heavy: bool) -> Target:
    return Target(
        MODELS / "digits",
        "digits",
        2,
        "onnxruntime",
        label,
        [1, 16],
        ["hypercorn", "uvicorn"],
        peer=True,
        heavy=heavy,
    )


def test_the_shipped_configuration_comes_first_and_departures_are_named() -> None:
    light = [s.name for s in setups(_target("digits", heavy=False), cores=2)]
    assert light == [
        "edgeserve shipped (hypercorn)",
        "edgeserve shipped (uvicorn)",
        "edgeserve auth off (uvicorn)",
        "edgeserve telemetry off (uvicorn)",
        "edgeserve shipped (uvicorn, asyncio loop)",
    ]
    heavy = [s.name for s in setups(_target("minilm", heavy=True), cores=2)]
    assert heavy[:2] == ["edgeserve shipped (hypercorn)", "edgeserve shipped (uvicorn)"]
    assert "edgeserve shipped (uvicorn, 1 batch x 2 threads)" in heavy
    assert "edgeserve shipped (uvicorn, binary tensors)" in heavy
    assert not any("auth off" in name for name in heavy)


def test_only_shipped_runs_the_headline_points() -> None:
    small = [s.name for s in setups(_target("digits", heavy=False), cores=2, headline=True)]
    assert small == [
        "edgeserve shipped (uvicorn)",
        "edgeserve auth off (uvicorn)",
        "edgeserve telemetry off (uvicorn)",
    ]
    heavy = setups(_target("minilm", heavy=True), cores=2, headline=True)
    # JSON first (issue 17's bound is read on it), then tritonclient's binary tensors
    assert [s.name for s in heavy] == [
        "edgeserve shipped (uvicorn)",
        "edgeserve shipped (uvicorn, binary tensors)",
    ]
    assert [s.binary for s in heavy] == [False, True]
    digits, text, minilm_fp32, minilm_int8 = (
        _target("digits v2", heavy=False),
        _target("text v1", heavy=False),
        _target("minilm v1", heavy=True),
        _target("minilm v2", heavy=True),
    )
    text.model, minilm_fp32.peer = "text", False
    chosen = headline_targets([minilm_fp32, minilm_int8, text, digits])
    assert chosen == [digits, minilm_int8]
    assert (digits.concurrencies, minilm_int8.concurrencies) == ([16], [32])


@pytest.mark.parametrize(
    ("variant", "auth", "telemetry"),
    [(SHIPPED, True, True), (AUTH_OFF, False, True), (TELEMETRY_OFF, True, False)],
)
def test_a_variant_departs_from_the_shipped_defaults_in_one_key(
    tmp_path: Path, variant: Variant, auth: bool, telemetry: bool
) -> None:
    path = tmp_path / "edgeserve.toml"
    path.write_text(edgeserve_config(8080, "uvicorn", tmp_path / "state", MODELS, variant))
    settings = load_settings(path)
    assert (settings.auth.enabled, settings.telemetry.enabled) == (auth, telemetry)
    assert settings.server.log_level == load_settings(None).server.log_level


def test_the_bench_server_is_shipped_and_answers_its_own_token(tmp_path: Path) -> None:
    """The default server refuses a request without a token and answers the one the
    bench minted with `edgeserve token create` and sends on every request."""
    repo = write_repository(tmp_path / "repo", MODELS / "digits", 2, "onnxruntime")
    body = b'{"inputs":[{"name":"input","datatype":"FP32","shape":[1,64],"data":[' + (
        b",".join([b"0"] * 64) + b"]}]}"
    )
    path = "/v2/models/digits/infer"
    with servers.edgeserve(tmp_path / "es", repo, "uvicorn") as srv:
        assert srv.headers["Authorization"].startswith("Bearer ")
        check_answers(srv.url, path, body, srv.headers)
        refused = httpx.post(
            srv.url + path, content=body, headers={"Content-Type": "application/json"}
        )
        assert refused.status_code == 401
        with pytest.raises(RuntimeError, match="answered 401"):
            check_answers(srv.url, path, body, {})
    script = wrk_lua(path, [body], {"Content-Type": "application/json", **srv.headers})
    assert f'wrk.headers["Authorization"] = "{srv.headers["Authorization"]}"' in script


@pytest.mark.skipif(not loadgen.have_wrk(), reason="wrk is not installed (apt install wrk)")
def test_wrk_sends_binary_tensor_bodies_byte_for_byte(tmp_path: Path) -> None:
    """Binary-extension bodies (raw tensor bytes after the JSON header, as tritonclient
    sends) reach the server intact through wrk's script: every answer is a 200."""
    folder = MODELS / "digits"
    specs = workload.signature(folder, 2, "onnxruntime")
    rows = workload.sample_rows(folder, specs, n=8)
    bodies, headers = workload.binary_workload(folder, 2, "onnxruntime", specs, rows)
    assert any(any(c > 0x7E for c in body) for body in bodies)  # not text
    repo = write_repository(tmp_path / "repo", folder, 2, "onnxruntime")
    with servers.edgeserve(tmp_path / "es", repo, "uvicorn") as srv:
        result = loadgen.run_wrk(
            srv.url, "/v2/models/digits/infer", bodies, 2, 1.0, {**headers, **srv.headers}
        )
    assert result.ok > 0
    assert (result.errors, result.refused) == (0, 0)


@pytest.mark.skipif(not loadgen.have_wrk(), reason="wrk is not installed (apt install wrk)")
def test_the_interleaved_ratio_tool_runs_the_server_floor_and_raw_point_in_turn(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bench.heavyratio end to end on the small model: one round of each segment, the
    ratios printed from neighbouring segments (their values are not the test's)."""
    args = ["--model-dir", str(MODELS / "digits"), "--rounds", "1", "--duration", "0.5"]
    assert heavyratio.main([*args, "--connections", "2"]) == 0
    out = capsys.readouterr().out
    assert "round 1: shipped " in out and " raw " in out and " floor " in out
    assert "shipped ÷ raw, median of the rounds' ratios" in out


def test_a_thread_stat_line_gives_its_name_and_cpu_seconds() -> None:
    line = "4242 (uvicorn (main) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3 0 100\n"
    assert parse_stat(line, ticks_per_s=100) == ("uvicorn (main) x", 3.0)
    threads = sample(os.getpid())
    assert os.getpid() in threads and threads[os.getpid()].cpu_s > 0


def test_event_loop_cpu_per_request_is_the_main_threads_difference() -> None:
    before = {10: ThreadCpu(10, "python", 1.0), 11: ThreadCpu(11, "runtime", 5.0)}
    after = {
        10: ThreadCpu(10, "python", 1.5),
        11: ThreadCpu(11, "runtime", 6.0),
        12: ThreadCpu(12, "new", 0.5),  # started during the run: counted from zero
    }
    cpu = per_request_us(10, before, after, 1000)
    assert cpu == {"loop_us_per_request": 500.0, "process_us_per_request": 2000.0}
    assert per_request_us(10, before, after, 0)["loop_us_per_request"] is None


def test_a_named_threads_cpu_per_request_is_read_by_its_kernel_name() -> None:
    before = {10: ThreadCpu(10, "python", 1.0), 11: ThreadCpu(11, "es-telemetry", 2.0)}
    after = {10: ThreadCpu(10, "python", 1.5), 11: ThreadCpu(11, "es-telemetry", 2.25)}
    assert named_us_per_request(before, after, 1000, "es-telemetry") == 250.0
    assert named_us_per_request(before, after, 1000, "other") is None


def _wrk_run(connections: int, req_per_s: float, **extra: object) -> dict:
    return {
        "connections": connections,
        "req_per_s": req_per_s,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        "refused": 0,
        "errors": 0,
        **extra,
    }


def _edgeserve(variant: str, connections: int, req_per_s: float, **extra: object) -> list[dict]:
    return [_wrk_run(connections, req_per_s, variant=variant, engine="uvicorn", lab="", **extra)]


HEADLINE_RESULTS = {
    "env": dict(ENV, engine="uvicorn"),
    "targets": [
        {
            "label": "digits v2 INT8 onnxruntime",
            "heavy": False,
            "vs_peer": True,
            "raw": None,
            "servers": {
                "edgeserve shipped (uvicorn)": _edgeserve(
                    "shipped", 16, 6000.0, loop_us_per_request=150.0, process_us_per_request=190.0
                ),
                "edgeserve auth off (uvicorn)": _edgeserve("auth off", 16, 6200.0),
                "edgeserve telemetry off (uvicorn)": _edgeserve("telemetry off", 16, 7500.0),
                # a lab change is not the shipped configuration, however fast
                "edgeserve shipped (uvicorn, asyncio loop)": [
                    _wrk_run(16, 9999.0, variant="shipped", engine="uvicorn", lab="asyncio loop")
                ],
                "Python floor (bench/floor.py)": [_wrk_run(16, 20000.0, loop_us_per_request=60.0)],
            },
            "peer": [_wrk_run(16, 1000.0)],
        },
        {
            "label": "minilm v2 INT8 onnxruntime",
            "heavy": True,
            "vs_peer": True,
            "raw": {"best_rows_per_s": 1300.0, "best_batch": 8, "best_plan": "2x1"},
            "servers": {
                "edgeserve shipped (uvicorn)": _edgeserve(
                    "shipped",
                    32,
                    1140.0,
                    raw_alongside_rows_per_s=[1250.0, 1150.0],
                    loop_us_per_request=170.0,
                ),
                "edgeserve shipped (uvicorn, binary tensors)": [
                    _wrk_run(
                        32,
                        1080.0,
                        variant="shipped",
                        engine="uvicorn",
                        lab="binary tensors",
                        raw_alongside_rows_per_s=[1200.0, 1200.0],
                    )
                ],
                "Python floor (bench/floor.py)": [
                    _wrk_run(
                        32, 1100.0, raw_alongside_rows_per_s=[1100.0, None], loop_us_per_request=70
                    )
                ],
            },
        },
    ],
    "overload": [],
}


def test_issue_17_figures_are_read_from_the_shipped_runs() -> None:
    got = {f.what: f for f in figures(HEADLINE_RESULTS)}
    small = "digits v2 INT8 onnxruntime, JSON, 16 connections"
    assert got[f"{small}: shipped ÷ MLServer"].value == 6.0
    assert got[f"{small}: shipped ÷ MLServer"].met is True
    assert got[f"{small}: shipped ÷ Python floor"].value == 0.3
    assert got[f"{small}: shipped ÷ Python floor"].met is False
    auth = got[f"{small}: auth on vs off"]
    assert round(auth.value or 0, 3) == 3.226 and auth.met is True  # (6,200 - 6,000) / 6,200
    telemetry = got[f"{small}: telemetry on vs off"]
    assert telemetry.value == 20.0 and telemetry.met is False
    heavy = got[
        "minilm v2 INT8 onnxruntime, 32 connections: shipped ÷ raw best batch measured alongside"
    ]
    assert heavy.value == 0.95 and heavy.met is True  # 1,140 over the mean 1,200
    assert "(the floor: 1.00×)" in heavy.measured
    binary = got[
        "minilm v2 INT8 onnxruntime, 32 connections, binary tensors: shipped ÷ raw best batch "
        "measured alongside"
    ]
    assert binary.value == 0.9 and binary.met is False  # its own run and its own bracket
    assert binary.measured == "1,080 vs 1,200 rows/s"
    loop = got["digits v2 INT8 onnxruntime, 16 connections: event-loop CPU per request"]
    assert (
        loop.value == 150.0 and loop.measured == "shipped 150 µs, floor 60 µs; whole process 190 µs"
    )
    assert (
        got["minilm v2 INT8 onnxruntime, 32 connections: event-loop CPU per request"].value == 170
    )


def test_a_figure_not_measured_reads_as_a_dash_not_a_pass() -> None:
    small = dict(HEADLINE_RESULTS["targets"][0])
    del small["peer"]  # MLServer was not installed for this run
    got = {f.what: f for f in figures({"env": ENV, "targets": [small], "overload": []})}
    mlserver = got["digits v2 INT8 onnxruntime, JSON, 16 connections: shipped ÷ MLServer"]
    assert (mlserver.value, mlserver.met) == (None, None)
    assert mlserver.measured == "6,000 vs – req/s"


def test_the_report_opens_with_the_shipped_figures() -> None:
    text = render(HEADLINE_RESULTS)
    headline = text.index("What issue 17 asks")
    assert headline < text.index("| model | server |")
    row = next(line for line in text.splitlines() if "auth on vs off" in line)
    assert row.endswith("| 6,000 vs 6,200 req/s | 3.2 % fewer | ≤ 5 % | yes |")
    row = next(line for line in text.splitlines() if "telemetry on vs off" in line)
    assert row.endswith("| 20.0 % fewer | ≤ 5 % | **no** |")
    shipped = next(
        line
        for line in text.splitlines()
        if line.startswith("| digits v2 INT8 onnxruntime | edgeserve shipped (uvicorn) |")
    )
    assert shipped.endswith("| 6.00× | 150 |")  # ÷ peer, then the loop's µs per request


def test_a_ratio_just_under_its_bound_does_not_read_as_the_bound() -> None:
    heavy = dict(HEADLINE_RESULTS["targets"][1])
    heavy["servers"] = {
        "edgeserve shipped (uvicorn)": _edgeserve(
            "shipped", 32, 915.0, raw_alongside_rows_per_s=[1000.0, 1000.0]
        )
    }
    text = render({"env": dict(ENV, engine="uvicorn"), "targets": [heavy], "overload": []})
    row = next(line for line in text.splitlines() if "measured alongside" in line)
    assert row.endswith("| 0.915× | ≥ 0.92× | **no** |")


def test_refusals_are_not_counted_as_throughput_in_the_figures() -> None:
    heavy = dict(HEADLINE_RESULTS["targets"][1])
    heavy["servers"] = {
        "edgeserve shipped (uvicorn)": _edgeserve(
            "shipped",
            32,
            1000.0,
            requests=10_000,
            refused=1_000,
            raw_alongside_rows_per_s=[1000.0, 1000.0],
        )
    }
    (figure, _) = figures({"env": dict(ENV, engine="uvicorn"), "targets": [heavy]})
    assert figure.value == 0.9  # 900 answered/s of wrk's 1,000 req/s
    assert figure.measured == "900 (1,000 refused) vs 1,000 rows/s"


def test_a_model_built_outside_models_is_found_and_models_wins_a_tie(tmp_path: Path) -> None:
    from bench.run import model_folders

    for name in ("minilm-elsewhere", "digits"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.toml").write_text("")
    found = model_folders([tmp_path / "minilm-elsewhere", tmp_path / "digits"])
    assert tmp_path / "minilm-elsewhere" in found
    assert MODELS / "digits" in found and tmp_path / "digits" not in found
