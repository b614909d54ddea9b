"""The shadow agreement summary (issue 20): rate per unit with its interval, top-score
difference, and the confusion between served and shadow classes."""

from __future__ import annotations

import pytest

from edgeserve.experiments.agreement import MAX_CLASSES, summarise


def test_agreement_rate_interval_score_difference_and_confusion() -> None:
    pairs = [(f"u{i % 10}", "cat", "cat" if i % 4 else "dog", 0.9, 0.7) for i in range(100)]
    report = summarise(pairs)
    assert report is not None
    assert (report["pairs"], report["units"]) == (100, 10)
    assert report["agreement_rate"] == pytest.approx(0.75)
    assert report["agreement_ci"]["low"] < 0.75 < report["agreement_ci"]["high"]
    assert report["mean_abs_top_score_difference"] == pytest.approx(0.2)
    assert report["confusion"] == {"cat": {"cat": 75, "dog": 25}}


def test_no_pairs_no_report_and_the_confusion_is_bounded() -> None:
    assert summarise([]) is None
    pairs = [("u", str(i), str(i + 1), None, None) for i in range(200)]
    report = summarise(pairs)
    assert report is not None and report["mean_abs_top_score_difference"] is None
    assert len(report["confusion"]) <= MAX_CLASSES + 1
    assert all(len(row) <= MAX_CLASSES + 1 for row in report["confusion"].values())
