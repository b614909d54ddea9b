"""The per-output request parameters of Triton's extensions, checked the same way for
every wire format: `classification` (top-k classes) and `binary_data` (REST only)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgeserve.errors import InvalidInput

MAX_CLASS_COUNT = 4096  # strings per row a classification output may ask for


def class_count(params: Mapping[str, Any], output: str) -> int:
    """The `classification` parameter: how many top classes to answer, 1..MAX_CLASS_COUNT
    (0 when absent). A count above the output's class count gives every class."""
    if "classification" not in params:
        return 0
    value = params["classification"]
    if type(value) is not int or not 1 <= value <= MAX_CLASS_COUNT:
        raise InvalidInput(
            f"output '{output[:64]}': parameter 'classification' must be a whole number "
            f"from 1 to {MAX_CLASS_COUNT}"
        )
    return value


def flag(params: Mapping[str, Any], name: str, where: str) -> bool | None:
    """A boolean parameter (`binary_data`, `binary_data_output`); None when absent."""
    if name not in params:
        return None
    value = params[name]
    if type(value) is not bool:
        raise InvalidInput(f"{where}: parameter '{name}' must be true or false")
    return value
