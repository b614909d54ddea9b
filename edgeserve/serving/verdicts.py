"""What a model version's request checks have already passed, remembered.

A check that depends only on what a request declares (names, datatypes, shapes) gives
the same verdict every time the same declaration comes again, and clients send the same
few over and over: the checks (edgeserve/serving/checks.py, `ModelVersion.check_inputs`)
keep their passes here and skip their loops for a declaration seen before. Only passes
are kept, so a refusal always takes the full check and its error is the same. Memory is
bounded by construction: at most PASSED_MAX keys, and a key that passed names only the
model's own inputs with shapes the model takes.
"""

from __future__ import annotations

from collections.abc import Hashable

# Distinct passing declarations one check remembers per model version (a batched model
# sees one per batch size): beyond it the memo starts again.
PASSED_MAX = 256


class Passed(set[Hashable]):
    """The declarations one check has passed for one model version: a bounded set (a
    set itself, so that the test for a pass is one `in`)."""

    def add(self, key: Hashable) -> None:
        """Remember a pass; a full memo is cleared first (it fills again with use)."""
        if len(self) >= PASSED_MAX:
            self.clear()
        super().add(key)
