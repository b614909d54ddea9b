"""Shadow agreement: how often the candidate's copy answered as the served control did.

A shadow run exists to collect this evidence before any user sees the candidate: the
agreement rate (per unit, with a delta-method interval, as every per-request metric
here), the mean absolute difference of the top score, and the confusion between the
served and the shadow classes. Reads the telemetry buffer: each shadow row is paired
with the served row of the same request id.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.experiments.distributions import normal_quantile
from edgeserve.experiments.model import Experiment
from edgeserve.experiments.observations import unit_column
from edgeserve.experiments.units import Ratio

MAX_PAIRS = 100_000  # the most recent pairs; bounds the memory of one report
MAX_CLASSES = 32  # confusion rows and columns shown; the rest are summed as "other"


def observe_agreement(db_path: Path, exp: Experiment) -> list[tuple[Any, ...]]:
    """(unit, served class, shadow class, served top score, shadow top score) per pair."""
    if exp.mode != "shadow" or not db_path.exists():
        return []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute(
            f"""SELECT {unit_column(exp, "s")}, s.prediction, c.prediction, s.top_score,
                       c.top_score
                FROM inferences c JOIN inferences s
                  ON s.request_id = c.request_id AND s.experiment = c.experiment
                 AND coalesce(s.shadow, 0) = 0 AND s.status = 200
                WHERE c.experiment = ? AND c.variant = ? AND c.shadow = 1 AND c.status = 200
                  AND c.prediction IS NOT NULL AND s.prediction IS NOT NULL
                GROUP BY c.seq ORDER BY c.seq DESC LIMIT {MAX_PAIRS}""",
            (exp.id, exp.variants[1].name),
        ).fetchall()
    finally:
        db.close()


def summarise(pairs: list[tuple[Any, ...]], alpha: float = 0.05) -> dict[str, Any] | None:
    """The agreement report of `observe_agreement`'s pairs; None when there are none."""
    if not pairs:
        return None
    units: dict[Any, list[int]] = {}
    for unit, served, shadow, *_ in pairs:
        counts = units.setdefault(unit, [0, 0])
        counts[0] += 1
        counts[1] += served == shadow
    table = np.array(list(units.values()), dtype=float)
    rate = Ratio.of(table[:, 1], table[:, 0], binary=True)
    half = normal_quantile(1 - alpha / 2) * math.sqrt(rate.variance)
    scores = np.array([(p[3], p[4]) for p in pairs if p[3] is not None and p[4] is not None])
    classes = Counter(str(p[1]) for p in pairs) + Counter(str(p[2]) for p in pairs)
    shown = {c for c, _ in classes.most_common(MAX_CLASSES)}
    confusion: dict[str, dict[str, int]] = {}
    for _, served, shadow, *_ in pairs:
        row = confusion.setdefault(str(served) if str(served) in shown else "other", {})
        column = str(shadow) if str(shadow) in shown else "other"
        row[column] = row.get(column, 0) + 1
    return {
        "pairs": len(pairs),
        "units": rate.units,
        "agreement_rate": rate.value,
        "agreement_ci": {"low": max(rate.value - half, 0.0), "high": min(rate.value + half, 1.0)},
        "mean_abs_top_score_difference": (
            float(np.abs(scores[:, 0] - scores[:, 1]).mean()) if scores.size else None
        ),
        "confusion": confusion,  # served class -> shadow class -> requests
    }
