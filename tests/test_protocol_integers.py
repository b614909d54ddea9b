"""The strict integer parser behind every path, query and header integer."""

from __future__ import annotations

import pytest

from edgeserve.protocol.integers import parse_uint


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("7", 7), ("0012", 12), ("9" * 18, 10**18 - 1)]
)
def test_ascii_digits_parse(text: str, value: int) -> None:
    assert parse_uint(text) == value


@pytest.mark.parametrize(
    "text",
    [None, "", "²", "٣", "1²", "-1", "+1", " 1", "1 ", "1_000", "1e3", "0x10", "1.0", "9" * 19],
)
def test_anything_else_is_refused(text: str | None) -> None:
    assert parse_uint(text) is None
