"""The one parser for integers a client writes in a path, query or header.

`str.isdigit()` is true for `²` and `٣`, which `int()` then refuses (a 500), and `int()`
itself accepts `+1`, ` 1`, `1_000` and any length. Here an integer is 1-18 ASCII digits,
which also keeps every value inside a signed 64-bit column.
"""

from __future__ import annotations

import re

UINT = re.compile(r"[0-9]{1,18}")


def parse_uint(text: str | None) -> int | None:
    """`text` as a non-negative integer, or None when it is not 1-18 ASCII digits."""
    if text is None or UINT.fullmatch(text) is None:
        return None
    return int(text)
