"""The memo of passed request checks holds whatever clients send in bounded memory."""

from __future__ import annotations

from edgeserve.serving.verdicts import PASSED_MAX, Passed


def test_passes_are_remembered_and_the_memo_never_outgrows_its_bound() -> None:
    passed = Passed()
    passed.add(("input", (1, 64)))
    assert ("input", (1, 64)) in passed
    assert ("input", (2, 64)) not in passed
    for rows in range(10 * PASSED_MAX):
        passed.add(("input", (rows, 64)))
        assert len(passed) <= PASSED_MAX
    assert ("input", (10 * PASSED_MAX - 1, 64)) in passed
