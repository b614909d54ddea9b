"""Per-variant observations of an experiment, read from the telemetry buffer.

Latency, errors and confidence come from the inference rows, summed per unit; accuracy
from feedback joined on the request id (an explicit `correct`, or a label equal to the
recorded prediction); business KPIs from events joined on the unit's keyed hash, counted
only inside each unit's exposure window.
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
    """What one variant saw. Per-request metrics are also kept per unit (`per_unit`), so
    they can be analysed at the randomisation unit (`edgeserve.experiments.units`)."""

    variant: str
    version: int
    requests: int = 0
    errors: int = 0
    latencies_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    confidence: np.ndarray = field(default_factory=lambda: np.empty(0))
    labelled: int = 0
    correct: int = 0
    units: int = 0  # distinct units with a request in this variant
    kpi_values: np.ndarray = field(default_factory=lambda: np.empty(0))  # per exposed unit
    kpi_pre: np.ndarray = field(default_factory=lambda: np.empty(0))  # before exposure, same units
    stage_units: int = 0  # distinct units since the weights last changed: what SRM compares
    per_unit: dict[str, np.ndarray] = field(default_factory=dict)

    def latency_ms(self, q: float) -> float | None:
        if not self.latencies_s.size:
            return None
        return float(np.percentile(self.latencies_s, q) * 1000)

    def unit_sums(self, name: str) -> np.ndarray:
        """One column of per-unit sums (see `_PER_UNIT`); empty before any request."""
        return self.per_unit.get(name, np.empty(0))


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


_WEIGHT_EVENTS = ("advanced", "weights", "rolled_back")


def weights_changed_at(exp: Experiment) -> float:
    """When the analysis window of the current weights began: the last stage advance or
    manual change. A rollback ends the experiment: its report keeps the window in which
    the decision was taken (no traffic reaches a concluded experiment)."""
    times = [h.get("time", 0.0) for h in exp.history if h.get("event") in ("advanced", "weights")]
    return max(times, default=0.0)


def window_weights(exp: Experiment) -> list[float]:
    """The weights that applied in the analysis window: after a rollback, the ones
    before it (recorded with the rollback), not the candidate's 0."""
    for entry in reversed(exp.history):
        if entry.get("event") in _WEIGHT_EVENTS:
            if entry.get("event") == "rolled_back" and isinstance(entry.get("weights"), list):
                return [float(w) for w in entry["weights"]]
            break
    return exp.weights


# Per-unit sums read for each variant, in this order.
_PER_UNIT = (
    "requests",
    "errors",
    "ok",  # answered requests (status 200): the latency denominator
    "latency_ms",
    "scored",  # answered requests with a top score
    "confidence",
    "in_window",  # 1 if the unit made a request since the weights last changed
)


def unit_column(exp: Experiment, table: str = "") -> str:
    """The SQL expression naming a row's unit: the request for request-level experiments,
    else the keyed hash of the unit recorded with the row (`table` qualifies the columns)."""
    t = f"{table}." if table else ""
    if exp.unit == "request_id":
        return f"{t}request_id"
    return f"coalesce({t}unit_hash, {t}request_id)"


def _fill(db: sqlite3.Connection, exp: Experiment, obs: Observations) -> None:
    where = "experiment = ? AND variant = ?"
    args = (exp.id, obs.variant)
    unit = unit_column(exp)
    rows = db.execute(
        f"""SELECT count(*), coalesce(sum(status >= 500), 0), coalesce(sum(status = 200), 0),
                   coalesce(sum(CASE WHEN status = 200 THEN total_s ELSE 0 END), 0) * 1000,
                   coalesce(sum(status = 200 AND top_score IS NOT NULL), 0),
                   coalesce(sum(CASE WHEN status = 200 THEN top_score END), 0),
                   max(time >= ?)
            FROM inferences WHERE {where} GROUP BY {unit}""",
        (weights_changed_at(exp), *args),
    ).fetchall()
    table = np.array(rows, dtype=float).reshape(-1, len(_PER_UNIT))
    obs.per_unit = {name: table[:, i] for i, name in enumerate(_PER_UNIT)}
    obs.units = int(table.shape[0])
    obs.requests = int(table[:, 0].sum())
    obs.errors = int(table[:, 1].sum())
    obs.stage_units = int(table[:, 6].sum())
    samples = db.execute(
        f"SELECT total_s, top_score FROM inferences WHERE {where} AND status = 200 "
        f"ORDER BY seq DESC LIMIT {MAX_LATENCY_SAMPLES}",
        args,
    ).fetchall()
    if samples:
        data = np.array([(r[0], np.nan if r[1] is None else r[1]) for r in samples], dtype=float)
        obs.latencies_s = data[:, 0]
        obs.confidence = data[:, 1][~np.isnan(data[:, 1])]
    _fill_labels(db, exp, obs)
    metric = exp.primary_metric
    if metric.startswith(("event:", "conversion:")):
        _fill_kpi(db, exp, obs, metric.split(":", 1)[1])


def _fill_labels(db: sqlite3.Connection, exp: Experiment, obs: Observations) -> None:
    """Correct/labelled per unit, one label per request id (the first). A `correct` flag
    is about the answer that was served: a shadow's copy earns it only where the shadow
    answered the same; where it answered otherwise it was wrong if the served answer was
    right, and unknown (not labelled) if the served one was wrong."""
    unit = unit_column(exp, "i")
    rows = db.execute(
        f"""SELECT unit, count(ok), coalesce(sum(ok), 0) FROM (
                SELECT min(i.seq), {unit} AS unit,
                       CASE WHEN f.correct IS NULL THEN f.label = i.prediction
                            WHEN coalesce(i.shadow, 0) = 0 THEN f.correct
                            WHEN i.prediction = s.prediction THEN f.correct
                            WHEN f.correct = 1 THEN 0
                            ELSE NULL END AS ok
                FROM inferences i
                JOIN (SELECT min(seq), request_id, label, correct FROM feedback
                      GROUP BY request_id) f ON f.request_id = i.request_id
                LEFT JOIN inferences s ON i.shadow = 1 AND s.request_id = i.request_id
                     AND coalesce(s.shadow, 0) = 0 AND s.experiment = i.experiment
                WHERE i.experiment = ? AND i.variant = ? AND i.status = 200
                GROUP BY i.request_id)
            GROUP BY unit""",
        (exp.id, obs.variant),
    ).fetchall()
    table = np.array([r[1:] for r in rows], dtype=float).reshape(-1, 2)
    obs.per_unit["labelled"], obs.per_unit["correct"] = table[:, 0], table[:, 1]
    obs.labelled, obs.correct = int(table[:, 0].sum()), int(table[:, 1].sum())


def _fill_kpi(db: sqlite3.Connection, exp: Experiment, obs: Observations, name: str) -> None:
    """KPI events per exposed unit, counted only inside the unit's exposure window: from
    its first request in this variant, for `conversion_window_s` when that is set. The
    same unit's events before exposure are its pre-period (the CUPED covariate)."""
    window = exp.conversion_window_s
    post = "(e.time >= u.t0 AND (? <= 0 OR e.time <= u.t0 + ?))"
    per_unit = db.execute(
        f"""SELECT u.h, coalesce(sum(CASE WHEN {post} THEN e.value END), 0),
                   count(CASE WHEN {post} THEN 1 END),
                   coalesce(sum(CASE WHEN e.time < u.t0 THEN e.value END), 0)
            FROM (SELECT unit_hash AS h, min(time) AS t0 FROM inferences
                  WHERE experiment = ? AND variant = ? AND unit_hash IS NOT NULL
                  GROUP BY unit_hash) u
            LEFT JOIN events e ON e.subject_hash = u.h AND e.name = ?
            GROUP BY u.h""",
        (window, window, window, window, exp.id, obs.variant, name),
    ).fetchall()
    if exp.primary_metric.startswith("conversion:"):
        obs.kpi_values = np.array([1.0 if r[2] else 0.0 for r in per_unit])
    else:
        obs.kpi_values = np.array([float(r[1]) for r in per_unit])
    obs.kpi_pre = np.array([float(r[3]) for r in per_unit])
