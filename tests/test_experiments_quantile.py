"""Mood's quantile test on p99 latency: its size under one distribution, its power on a
heavier tail, and its place in a report read through the real server."""

from __future__ import annotations

import math

import httpx
import numpy as np

from edgeserve.experiments.quantile import hypergeometric_upper_tail, quantile_test
from tests.waiting import wait_until

ROW = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}


def test_the_hypergeometric_tail_matches_a_direct_sum() -> None:
    # 10 balls, 4 white, draw 5: P(X >= 3) = (C(4,3)C(6,2) + C(4,4)C(6,1)) / C(10,5)
    expected = (4 * 15 + 1 * 6) / 252
    assert math.isclose(hypergeometric_upper_tail(3, 10, 4, 5), expected, rel_tol=1e-9)
    assert hypergeometric_upper_tail(0, 10, 4, 5) == 1.0
    assert hypergeometric_upper_tail(5, 10, 4, 5) == 0.0


def test_one_distribution_rarely_looks_worse_and_a_heavier_tail_does() -> None:
    rng = np.random.default_rng(7)
    false_alarms = detected = 0
    for _ in range(200):
        control = rng.lognormal(-4.0, 0.3, 4000)
        same = rng.lognormal(-4.0, 0.3, 4000)
        slow_tail = rng.lognormal(-4.0, 0.3, 4000)
        slow_tail[:80] *= 3  # 2% of requests three times slower: p99 moves, the mean barely
        false_alarms += quantile_test(control, same).worse
        detected += quantile_test(control, slow_tail).worse
    assert false_alarms <= 20  # alpha = 0.05 of 200, with room for sampling noise
    assert detected >= 190


def test_the_report_carries_the_p99_quantile_test(server) -> None:
    body = {
        "id": "p99-mood",
        "model": "digits",
        "variants": [
            {"name": "control", "version": 1, "weight": 50},
            {"name": "candidate", "version": 2, "weight": 50},
        ],
    }
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/api/experiments", json=body).status_code == 201, "created"
        for _ in range(400):
            reply = client.post("/v2/models/digits/infer", json=ROW)
            assert reply.status_code == 200, reply.text

        def tested() -> dict | None:
            report = client.get("/api/experiments/p99-mood/report").json()
            tests = report.get("p99_latency_tests") or []
            return tests[0] if tests and tests[0]["test"] is not None else None

        found = wait_until(tested, 60, "the p99 quantile test in the report")
    assert found["variant"] == "candidate"
    test = found["test"]
    assert test["test"].startswith("Mood quantile test")
    assert test["control_requests"] + test["candidate_requests"] >= 1
    assert 0.0 <= test["p_value"] <= 1.0 and test["threshold_ms"] > 0
