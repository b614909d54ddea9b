"""Prediction drift per model version: is a version answering differently from how it
started?

The baseline is the version's first `baseline_requests` answered requests on this box,
the live window its most recent `window_requests`. Both are compared on the predicted
classes and on a histogram of the top score, by the population stability index (PSI,
the credit-scoring rule of thumb: < 0.1 stable, 0.1-0.25 some shift, > 0.25 a real
one) and a chi-square test of homogeneity. Drift is flagged when a PSI is over the
threshold and the chi-square test agrees (p < `max_p_value`): PSI alone flaps on small
windows, a test alone flags shifts too small to matter on large ones.
"""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.experiments.distributions import chi_square_p
from edgeserve.experiments.stats import json_safe

SCORE_BINS = np.linspace(0.0, 1.0, 11)  # top-score histogram: ten bins of 0.1
PSI_FLOOR = 1e-4  # an empty bin counts as this share, so PSI stays finite


@dataclass(frozen=True)
class DriftCheck:
    """One version's live predictions against its baseline."""

    model: str
    version: str
    baseline: int  # requests in the baseline
    live: int  # requests in the live window
    psi_classes: float
    psi_top_score: float | None  # None: the version records no top score
    chi_square_p: float  # classes (and score bins) homogeneous between the two
    drifted: bool

    def as_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def psi(baseline: Sequence[float] | np.ndarray, live: Sequence[float] | np.ndarray) -> float:
    """Population stability index of two histograms over the same bins (counts)."""
    b = np.asarray(baseline, dtype=float)
    v = np.asarray(live, dtype=float)
    b = np.maximum(b / b.sum(), PSI_FLOOR)
    v = np.maximum(v / v.sum(), PSI_FLOOR)
    return float(np.sum((v - b) * np.log(v / b)))


def homogeneity_p(
    baseline: Sequence[float] | np.ndarray, live: Sequence[float] | np.ndarray
) -> float:
    """Chi-square test that two histograms come from one distribution (bins empty in
    both are dropped)."""
    table = np.array([baseline, live], dtype=float)
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return 1.0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    return chi_square_p(statistic, table.shape[1] - 1)


def compare(
    model: str,
    version: str,
    baseline: Sequence[tuple[str | None, float | None]],
    live: Sequence[tuple[str | None, float | None]],
    psi_threshold: float = 0.2,
    max_p_value: float = 0.001,
) -> DriftCheck:
    """Drift of `live` (prediction, top score) pairs against `baseline` ones."""
    classes = sorted({str(p) for p, _ in baseline} | {str(p) for p, _ in live})
    base_c, live_c = Counter(str(p) for p, _ in baseline), Counter(str(p) for p, _ in live)
    b_classes = [base_c[c] for c in classes]
    l_classes = [live_c[c] for c in classes]
    base_s = np.array([s for _, s in baseline if s is not None], dtype=float)
    live_s = np.array([s for _, s in live if s is not None], dtype=float)
    psi_scores = None
    p_value = homogeneity_p(b_classes, l_classes)
    if base_s.size and live_s.size:
        b_hist = np.histogram(np.clip(base_s, 0, 1), SCORE_BINS)[0]
        l_hist = np.histogram(np.clip(live_s, 0, 1), SCORE_BINS)[0]
        psi_scores = psi(b_hist, l_hist)
        # both views at once, one test: Bonferroni over the two
        p_value = min(1.0, 2 * min(p_value, homogeneity_p(b_hist, l_hist)))
    psi_classes = psi(b_classes, l_classes) if classes else 0.0
    worst = max(psi_classes, psi_scores or 0.0)
    drifted = worst > psi_threshold and p_value < max_p_value
    return DriftCheck(
        model, version, len(baseline), len(live), psi_classes, psi_scores, p_value, drifted
    )


def observe(
    db_path: Path, baseline_requests: int, window_requests: int
) -> list[tuple[str, str, list[Any], list[Any]]]:
    """(model, version, baseline pairs, live pairs) for each version with more answered
    requests than its baseline; the live window never overlaps the baseline."""
    if not db_path.exists():
        return []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    out = []
    try:
        versions = db.execute(
            "SELECT model, version, count(*) FROM inferences WHERE status = 200 "
            "AND prediction IS NOT NULL GROUP BY model, version"
        ).fetchall()
        for model, version, count in versions:
            if count <= baseline_requests:
                continue
            live_n = min(window_requests, count - baseline_requests)
            query = (
                "SELECT prediction, top_score FROM inferences WHERE model = ? AND version = ? "
                "AND status = 200 AND prediction IS NOT NULL ORDER BY seq {} LIMIT ?"
            )
            baseline = db.execute(query.format("ASC"), (model, version, baseline_requests))
            base_rows = baseline.fetchall()
            live_rows = db.execute(query.format("DESC"), (model, version, live_n)).fetchall()
            out.append((model, version, base_rows, live_rows))
    finally:
        db.close()
    return out


def check_all(
    db_path: Path,
    baseline_requests: int,
    window_requests: int,
    psi_threshold: float,
    min_window: int,
) -> list[DriftCheck]:
    """Every version's drift check, for those with at least `min_window` live requests."""
    return [
        compare(model, version, base, live, psi_threshold)
        for model, version, base, live in observe(db_path, baseline_requests, window_requests)
        if len(live) >= min_window
    ]


def describe(check: DriftCheck) -> str:
    """The alert's message."""
    scores = "" if check.psi_top_score is None else f", top score PSI {check.psi_top_score:.3f}"
    p = check.chi_square_p
    shown = f"{p:.2g}" if math.isfinite(p) else "n/a"
    return (
        f"model {check.model} version {check.version}: predictions drifted from its first "
        f"{check.baseline} requests (class PSI {check.psi_classes:.3f}{scores}, p={shown})"
    )
