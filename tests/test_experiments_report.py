"""The report read from a real SQLite telemetry file: the SRM check compares the counts
since the weights last changed, so a staged rollout is not mistaken for broken assignment."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from edgeserve.experiments.decision import decide, policy_for
from edgeserve.experiments.model import parse_definition
from edgeserve.experiments.observations import observe
from edgeserve.experiments.report import build_report, variant_summaries
from edgeserve.experiments.units import Ratio


def _telemetry(
    path: Path,
    rows: list[tuple[str, str, float, int]],
    correct: dict[str, int] | None = None,
) -> None:
    """Just the columns the report reads; rows are (request_id, variant, time, status),
    `correct` is the feedback sent later (request id -> 1 right / 0 wrong)."""
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE inferences (seq INTEGER PRIMARY KEY, request_id TEXT, model TEXT,
               version TEXT, status INTEGER, total_s REAL, time REAL, experiment TEXT,
               variant TEXT, top_score REAL, subject_hash TEXT, unit_hash TEXT, shadow INTEGER,
               prediction TEXT);
           CREATE TABLE feedback (seq INTEGER PRIMARY KEY, request_id TEXT, label TEXT,
               correct INTEGER, time REAL);
           CREATE TABLE events (seq INTEGER PRIMARY KEY, name TEXT, value REAL,
               subject_hash TEXT, time REAL);"""
    )
    db.executemany(
        "INSERT INTO inferences (request_id, model, version, status, total_s, time, "
        "experiment, variant) VALUES (?, 'digits', ?, ?, 0.01, ?, 'e', ?)",
        [(rid, "1" if v == "v1" else "2", status, t, v) for rid, v, t, status in rows],
    )
    db.executemany(
        "INSERT INTO feedback (request_id, correct, time) VALUES (?, ?, 0)",
        list((correct or {}).items()),
    )
    db.commit()
    db.close()


def test_srm_after_a_stage_advance_compares_the_new_stage_only(tmp_path: Path) -> None:
    exp = parse_definition(
        {
            "id": "e",
            "model": "digits",
            "variants": [{"name": "v1", "version": 1}, {"name": "v2", "version": 2}],
            "stages": [5, 25, 50],
        }
    )
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8000):  # stage 0 at 5%, until t = 1000
        rows.append((f"a{i}", "v2" if rng.random() < 0.05 else "v1", 500.0, 200))
    exp.history.append({"time": 1000.0, "event": "advanced", "reason": "stage 1: 25%"})
    exp.set_candidate_share(25.0)
    for i in range(4000):  # stage 1 at 25%
        rows.append((f"b{i}", "v2" if rng.random() < 0.25 else "v1", 1500.0, 200))
    path = tmp_path / "telemetry.db"
    _telemetry(path, rows)
    observations = observe(path, exp)
    assert sum(o.requests for o in observations) == 12_000
    assert sum(o.stage_units for o in observations) == 4000
    report = build_report(exp, observations, alpha=0.05, tau_relative=0.1, min_samples=200)
    srm = report["sample_ratio_mismatch"]
    assert srm["observed"] == [o.stage_units for o in observations]
    assert not srm["mismatch"]
    assert "sample ratio mismatch" not in report["decision"]["reason"]


def test_a_real_mismatch_in_the_current_stage_is_still_flagged(tmp_path: Path) -> None:
    exp = parse_definition(
        {
            "id": "e",
            "model": "digits",
            "variants": [{"name": "v1", "version": 1}, {"name": "v2", "version": 2}],
        }
    )
    rows = [(f"r{i}", "v1" if i % 100 < 52 else "v2", 10.0, 200) for i in range(20_000)]
    path = tmp_path / "telemetry.db"
    _telemetry(path, rows)
    report = build_report(exp, observe(path, exp), alpha=0.05, tau_relative=0.1, min_samples=200)
    assert report["sample_ratio_mismatch"]["mismatch"]


@pytest.mark.parametrize(
    ("accuracy_v2", "errors_v2", "action"),
    [(0.96, 0.0, "promote"), (0.90, 0.0, "continue"), (0.90, 0.2, "rollback")],
)
def test_summaries_from_telemetry_drive_the_pure_decision(
    tmp_path: Path, accuracy_v2: float, errors_v2: float, action: str
) -> None:
    exp = parse_definition(
        {
            "id": "e",
            "model": "digits",
            "variants": [{"name": "v1", "version": 1}, {"name": "v2", "version": 2}],
            "auto": True,
        }
    )
    rng = np.random.default_rng(1)
    rows, correct = [], {}
    for i in range(4000):
        variant = "v1" if i % 2 else "v2"
        failed = variant == "v2" and rng.random() < errors_v2
        rows.append((f"r{i}", variant, 10.0, 500 if failed else 200))
        if not failed:
            p = 0.90 if variant == "v1" else accuracy_v2
            correct[f"r{i}"] = int(rng.random() < p)
    path = tmp_path / "telemetry.db"
    _telemetry(path, rows, correct)
    summaries = variant_summaries(exp, observe(path, exp))
    accuracy = summaries[0].metrics["accuracy"]  # per unit: here a unit is a request
    assert isinstance(accuracy, Ratio)
    assert (accuracy.y, accuracy.x, accuracy.units) == (
        sum(v for k, v in correct.items() if int(k[1:]) % 2),
        2000,
        2000,
    )
    decision = decide(summaries, exp.weights, policy_for(exp, 0.05, 0.1, 200))
    assert decision.action == action, decision.reason
    report = build_report(exp, observe(path, exp), alpha=0.05, tau_relative=0.1, min_samples=200)
    assert report["decision"]["action"] == action  # the server's decision agrees
