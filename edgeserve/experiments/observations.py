"""Per-variant observations of an experiment, read from the telemetry buffer.

Latency, errors and confidence come from the inference rows; accuracy from feedback
joined on the request id (an explicit `correct`, or a label equal to the recorded
prediction); business KPIs from events joined on the unit's keyed hash.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeserve.experiments.model import Experiment

MAX_LATENCY_SAMPLES = 100_000


@dataclass
class Observations:
    variant: str
    version: int
    requests: int = 0
    errors: int = 0
    latencies_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    confidence: np.ndarray = field(default_factory=lambda: np.empty(0))
    labelled: int = 0
    correct: int = 0
    units: int = 0
    kpi_values: np.ndarray = field(default_factory=lambda: np.empty(0))  # per exposed unit
    stage_requests: int = 0  # since the weights last changed: what the SRM check compares

    def latency_ms(self, q: float) -> float | None:
        if not self.latencies_s.size:
            return None
        return float(np.percentile(self.latencies_s, q) * 1000)


def observe(db_path: Path, exp: Experiment) -> list[Observations]:
    """Observations for each variant of `exp` (empty ones when nothing is recorded yet)."""
    out = [Observations(v.name, v.version) for v in exp.variants]
    if not db_path.exists():
        return out
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        for obs in out:
            _fill(db, exp, obs)
    finally:
        db.close()
    return out


def weights_changed_at(exp: Experiment) -> float:
    """When the current weights took effect (a stage advance or a manual change)."""
    times = [h.get("time", 0.0) for h in exp.history if h.get("event") in ("advanced", "weights")]
    return max(times, default=0.0)


def _fill(db: sqlite3.Connection, exp: Experiment, obs: Observations) -> None:
    where = "experiment = ? AND variant = ?"
    args = (exp.id, obs.variant)
    obs.requests, obs.errors = db.execute(
        f"SELECT count(*), coalesce(sum(status >= 500), 0) FROM inferences WHERE {where}", args
    ).fetchone()
    obs.stage_requests = db.execute(
        f"SELECT count(*) FROM inferences WHERE {where} AND time >= ?",
        (*args, weights_changed_at(exp)),
    ).fetchone()[0]
    rows = db.execute(
        f"SELECT total_s, top_score FROM inferences WHERE {where} AND status = 200 "
        f"ORDER BY seq DESC LIMIT {MAX_LATENCY_SAMPLES}",
        args,
    ).fetchall()
    if rows:
        data = np.array([(r[0], np.nan if r[1] is None else r[1]) for r in rows], dtype=float)
        obs.latencies_s = data[:, 0]
        obs.confidence = data[:, 1][~np.isnan(data[:, 1])]
    # One label per request id, the first (min seq: SQLite takes the bare columns from
    # that row), however many rows share the id: a client that repeats its label or its
    # request id still counts once.
    obs.labelled, obs.correct = db.execute(
        f"""SELECT count(*), coalesce(sum(ok), 0) FROM (
                SELECT min(f.seq), CASE WHEN f.correct IS NOT NULL THEN f.correct
                                   ELSE f.label = i.prediction END AS ok
                FROM inferences i JOIN feedback f ON f.request_id = i.request_id
                WHERE i.{where.replace(" AND ", " AND i.")} AND i.status = 200
                GROUP BY f.request_id)""",
        args,
    ).fetchone()
    metric = exp.primary_metric
    if metric.startswith(("event:", "conversion:")):
        name = metric.split(":", 1)[1]
        per_unit = db.execute(
            f"""SELECT u.subject_hash, coalesce(sum(e.value), 0), count(e.seq)
                FROM (SELECT DISTINCT subject_hash FROM inferences
                      WHERE {where} AND subject_hash IS NOT NULL) u
                LEFT JOIN events e ON e.subject_hash = u.subject_hash AND e.name = ?
                GROUP BY u.subject_hash""",
            (*args, name),
        ).fetchall()
        obs.units = len(per_unit)
        if metric.startswith("conversion:"):
            obs.kpi_values = np.array([1.0 if r[2] else 0.0 for r in per_unit])
        else:
            obs.kpi_values = np.array([float(r[1]) for r in per_unit])
