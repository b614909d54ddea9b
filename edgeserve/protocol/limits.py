"""Request limits applied while decoding, before any tensor is allocated."""

from __future__ import annotations

from dataclasses import dataclass

from edgeserve.config.loader import LimitSettings
from edgeserve.errors import InvalidInput, PayloadTooLarge


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    max_inputs: int
    max_tensor_elements: int
    max_tensor_rank: int
    max_json_depth: int
    max_bytes_element: int

    @classmethod
    def from_settings(cls, s: LimitSettings) -> DecodeLimits:
        return cls(
            s.max_inputs,
            s.max_tensor_elements,
            s.max_tensor_rank,
            s.max_json_depth,
            s.max_bytes_element,
        )


def checked_shape(raw: object, name: str, limits: DecodeLimits) -> tuple[tuple[int, ...], int]:
    """Validate a declared shape; return it with its element count, refusing bombs early."""
    if not isinstance(raw, list):
        raise InvalidInput(f"input '{name}': shape must be a list of integers")
    if len(raw) > limits.max_tensor_rank:
        raise InvalidInput(
            f"input '{name}': rank {len(raw)} exceeds the limit of {limits.max_tensor_rank}"
        )
    max_elements = limits.max_tensor_elements
    count = 1
    for d in raw:
        if type(d) is not int or d < 0:
            raise InvalidInput(f"input '{name}': shape must hold non-negative integers")
        count *= d
        # each dimension too: beside a 0 the count stays 0 whatever the others say
        if count > max_elements or d > max_elements:
            raise PayloadTooLarge(
                f"input '{name}': shape {raw} exceeds the limit of {max_elements} elements"
            )
    return tuple(raw), count
