"""Prediction drift per model version: is a version answering differently from how it
started?

The baseline is the version's first `baseline_requests` answered requests on this box,
saved once (`drift_watch`), the live window its most recent `window_requests` after it.
Both are compared on the predicted classes and on a histogram of the top score, by the
population stability index (PSI, the credit-scoring rule of thumb: < 0.1 stable,
0.1-0.25 some shift, > 0.25 a real one) and a chi-square test of homogeneity. Drift is
flagged when a PSI is over the threshold and the chi-square test agrees (p <
`max_p_value`): PSI alone flaps on small windows, a test alone flags shifts too small to
matter on large ones.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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


@dataclass
class Histogram:
    """Predicted classes and top-score bins of some requests: all a check needs, small
    enough to save (a baseline) and to update row by row (a live window)."""

    classes: Counter[str] = field(default_factory=Counter)
    scores: np.ndarray = field(default_factory=lambda: np.zeros(len(SCORE_BINS) - 1, int))
    requests: int = 0

    def add(self, prediction: str | None, top_score: float | None) -> None:
        self.classes[str(prediction)] += 1
        if top_score is not None:
            self.scores[_score_bin(top_score)] += 1
        self.requests += 1

    @classmethod
    def of(cls, pairs: Sequence[tuple[str | None, float | None]]) -> Histogram:
        out = cls()
        for prediction, score in pairs:
            out.add(prediction, score)
        return out


def _score_bin(score: float) -> int:
    """np.histogram's bin over SCORE_BINS (the last bin closed), after clipping to [0, 1]."""
    return min(int(min(max(score, 0.0), 1.0) * (len(SCORE_BINS) - 1)), len(SCORE_BINS) - 2)


def compare(
    model: str,
    version: str,
    baseline: Sequence[tuple[str | None, float | None]],
    live: Sequence[tuple[str | None, float | None]],
    psi_threshold: float = 0.2,
    max_p_value: float = 0.001,
) -> DriftCheck:
    """Drift of `live` (prediction, top score) pairs against `baseline` ones."""
    return compare_histograms(
        model, version, Histogram.of(baseline), Histogram.of(live), psi_threshold, max_p_value
    )


def compare_histograms(
    model: str,
    version: str,
    baseline: Histogram,
    live: Histogram,
    psi_threshold: float = 0.2,
    max_p_value: float = 0.001,
) -> DriftCheck:
    """Drift of a live histogram against the version's baseline one."""
    classes = sorted(set(baseline.classes) | set(live.classes))
    b_classes = [baseline.classes[c] for c in classes]
    l_classes = [live.classes[c] for c in classes]
    psi_scores = None
    p_value = homogeneity_p(b_classes, l_classes)
    if baseline.scores.sum() and live.scores.sum():
        psi_scores = psi(baseline.scores, live.scores)
        # both views at once, one test: Bonferroni over the two
        p_value = min(1.0, 2 * min(p_value, homogeneity_p(baseline.scores, live.scores)))
    psi_classes = psi(b_classes, l_classes) if classes else 0.0
    worst = max(psi_classes, psi_scores or 0.0)
    drifted = worst > psi_threshold and p_value < max_p_value
    return DriftCheck(
        model,
        version,
        baseline.requests,
        live.requests,
        psi_classes,
        psi_scores,
        p_value,
        drifted,
    )


def describe(check: DriftCheck) -> str:
    """The alert's message."""
    scores = "" if check.psi_top_score is None else f", top score PSI {check.psi_top_score:.3f}"
    p = check.chi_square_p
    shown = f"{p:.2g}" if math.isfinite(p) else "n/a"
    return (
        f"model {check.model} version {check.version}: predictions drifted from its first "
        f"{check.baseline} requests (class PSI {check.psi_classes:.3f}{scores}, p={shown})"
    )
