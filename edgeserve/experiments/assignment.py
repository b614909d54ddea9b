"""Deterministic assignment of units to variants.

A unit (user, device, request) is hashed with the experiment's salt into [0, 1):
the first 8 bytes of SHA-256("{salt}:{unit}") as an unsigned integer / 2**64. Variants
own contiguous ranges laid out in order, as GrowthBook's bucket ranges do, so a unit
keeps its variant across requests and restarts, and moving a candidate from 10% to 20%
moves only the units in the 10% of the line that changes hands.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def unit_position(salt: str, unit: str) -> float:
    """Where `unit` falls on [0, 1) for this salt."""
    digest = hashlib.sha256(f"{salt}:{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def bucket_ranges(weights: Sequence[float]) -> list[tuple[float, float]]:
    """Contiguous [start, end) ranges in variant order; weights are normalised."""
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError("weights must be >= 0 and not all 0")
    ranges = []
    start = 0.0
    for w in weights:
        end = start + w / total
        ranges.append((start, end))
        start = end
    return ranges


def choose_variant(salt: str, unit: str, weights: Sequence[float]) -> int:
    """Index of the variant whose range holds the unit's position."""
    position = unit_position(salt, unit)
    ranges = bucket_ranges(weights)
    for index, (start, end) in enumerate(ranges):
        if start <= position < end:
            return index
    return len(ranges) - 1  # position in the float rounding gap at 1.0


def in_rollout(salt: str, unit: str, percent: float) -> bool:
    """Gradual rollout: the first `percent` of the line is in."""
    return unit_position(salt, unit) < percent / 100.0
