"""Prediction drift per model version (issue 20): a version fed a shifted input
distribution (faded ink: pixels at half intensity) raises the drift alert, one fed the
same distribution as its baseline does not, over 20 seeded runs of the real digits
model; and end to end, the alert goes out through telemetry's alert path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from edgeserve.experiments.drift import compare, psi
from tests.serving import MODELS, RunningServer, run_server
from tests.waiting import wait_until

X = np.load(MODELS / "digits" / "heldout.npz")["X"].astype(np.float32)


@pytest.fixture(scope="module")
def session() -> ort.InferenceSession:
    return ort.InferenceSession(str(MODELS / "digits" / "1" / "model.onnx"))


def _answers(session: ort.InferenceSession, rows: np.ndarray) -> list[tuple[str, float]]:
    probabilities, labels = session.run(["probabilities", "label"], {"input": rows})
    return [(str(label), float(p.max())) for label, p in zip(labels, probabilities, strict=True)]


def test_shifted_inputs_raise_drift_and_unshifted_ones_do_not(
    session: ort.InferenceSession,
) -> None:
    unshifted_alerts = shifted_alerts = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        baseline = _answers(session, X[rng.integers(len(X), size=500)])
        same = _answers(session, X[rng.integers(len(X), size=500)])
        faded = _answers(session, X[rng.integers(len(X), size=500)] * 0.5)
        unshifted_alerts += compare("digits", "1", baseline, same).drifted
        shifted_alerts += compare("digits", "1", baseline, faded).drifted
    assert (unshifted_alerts, shifted_alerts) == (0, 20)


def test_psi_of_identical_histograms_is_zero_and_grows_with_the_shift() -> None:
    assert psi([10, 20, 30], [10, 20, 30]) == pytest.approx(0.0)
    assert 0 < psi([10, 20, 30], [12, 20, 28]) < psi([10, 20, 30], [30, 20, 10])


CONFIG = (
    "[auth]\nenabled = false\n[telemetry]\nwrite_interval_ms = 20.0\n"
    "[experiments]\ndrift_interval_s = 0.2\ndrift_baseline_requests = 250\n"
    "drift_window_requests = 250\n"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with run_server(tmp_path_factory.mktemp("drift"), CONFIG) as running:
        yield running


def _infer(
    client: httpx.Client, version: str, rows: np.ndarray, headers: dict[str, str] | None = None
) -> None:
    for row in rows:
        body = {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 64], "data": row.tolist()}
            ]
        }
        reply = client.post(
            f"/v2/models/digits/versions/{version}/infer", json=body, headers=headers
        )
        assert reply.status_code == 200, reply.text


def _check(client: httpx.Client, version: str) -> dict | None:
    checks = client.get("/api/drift").json()["checks"]
    return next((c for c in checks if c["model"] == "digits" and c["version"] == version), None)


def test_a_drifting_version_raises_the_alert_through_telemetry(server: RunningServer) -> None:
    rng = np.random.default_rng(1)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        _infer(client, "1", X[rng.integers(len(X), size=310)])  # baseline, then the same
        _infer(client, "2", X[rng.integers(len(X), size=250)])  # baseline
        _infer(client, "2", X[rng.integers(len(X), size=250)] * 0.5)  # faded ink
        drifted = wait_until(
            lambda: (c := _check(client, "2")) is not None and c["live"] == 250 and c,
            60,
            "a drift check of digits version 2 over its live window",
        )
        stable = wait_until(
            lambda: (c := _check(client, "1")) is not None and c["live"] == 60 and c,
            60,
            "a drift check of digits version 1",
        )
        assert drifted["drifted"] and drifted["psi_top_score"] > 0.2, str((drifted, stable))
        assert not stable["drifted"], stable
        metric = 'edgeserve_alerts_firing{rule="prediction_drift:digits/2"} 1.0'
        wait_until(lambda: metric in client.get("/metrics").text, 30, "the drift alert in /metrics")
        assert 'rule="prediction_drift:digits/1"' not in client.get("/metrics").text
        page = client.get("/dashboard", headers={"Authorization": "Bearer any"}).text
        assert "Prediction drift" in page and "drifted" in page
    assert "prediction drift model=digits version=2 state=firing" in server.log()


def test_a_drift_alert_resolves_when_its_version_stops_being_checked(tmp_path: Path) -> None:
    """Unloading a drifting version stops its checks; its alert must not fire forever."""
    rng = np.random.default_rng(2)
    firing = 'edgeserve_alerts_firing{rule="prediction_drift:digits/2"} 1.0'
    resolved = 'edgeserve_alerts_firing{rule="prediction_drift:digits/2"} 0.0'
    with run_server(tmp_path, CONFIG) as server, httpx.Client(base_url=server.url) as client:
        _infer(client, "2", X[rng.integers(len(X), size=250)])
        _infer(client, "2", X[rng.integers(len(X), size=250)] * 0.5)
        wait_until(lambda: firing in client.get("/metrics").text, 60, "the drift alert")
        reply = client.post("/v2/repository/models/digits/unload")
        assert reply.status_code == 200, reply.text
        wait_until(lambda: resolved in client.get("/metrics").text, 60, "the alert resolved")
        assert _check(client, "2") is None
    assert "prediction drift model=digits version=2 state=resolved" in server.log()


def _baseline_then_forget(client: httpx.Client, rng: np.random.Generator) -> None:
    """Version 2's first 250 rows from subject "early" (its baseline), 60 more for the
    first check, then "early" forgotten: the rows the baseline came from are gone."""
    _infer(client, "2", X[rng.integers(len(X), size=250)], {"x-user-id": "early"})
    _infer(client, "2", X[rng.integers(len(X), size=60)])
    wait_until(
        lambda: (c := _check(client, "2")) is not None and c["live"] == 60,
        60,
        "the first check of version 2 (its baseline taken)",
    )
    forgotten = client.post("/api/telemetry/forget", json={"subject": "early"})
    assert forgotten.status_code == 200, forgotten.text


def test_the_baseline_stays_the_versions_first_requests_when_those_rows_go(
    tmp_path: Path,
) -> None:
    """Forgetting (or evicting) a version's first rows must not turn its later, drifted
    requests into the baseline: the baseline is saved once."""
    rng = np.random.default_rng(3)
    firing = 'edgeserve_alerts_firing{rule="prediction_drift:digits/2"} 1.0'
    with run_server(tmp_path, CONFIG) as server, httpx.Client(base_url=server.url) as client:
        _baseline_then_forget(client, rng)
        _infer(client, "2", X[rng.integers(len(X), size=250)] * 0.5)  # faded ink
        wait_until(lambda: firing in client.get("/metrics").text, 60, "the drift alert")
        check = _check(client, "2")
        assert check is not None and check["baseline"] == 250 and check["drifted"], check


def test_the_saved_baseline_outlives_a_restart(tmp_path: Path) -> None:
    """The baseline is read back at start: a restart after its rows were forgotten
    still compares with the version's first requests."""
    rng = np.random.default_rng(4)
    firing = 'edgeserve_alerts_firing{rule="prediction_drift:digits/2"} 1.0'
    with run_server(tmp_path, CONFIG) as first, httpx.Client(base_url=first.url) as client:
        _baseline_then_forget(client, rng)
    with run_server(tmp_path, CONFIG) as second, httpx.Client(base_url=second.url) as client:
        _infer(client, "2", X[rng.integers(len(X), size=250)] * 0.5)  # faded ink
        wait_until(lambda: firing in client.get("/metrics").text, 60, "the drift alert")
        check = _check(client, "2")
        assert check is not None and check["baseline"] == 250 and check["drifted"], check
