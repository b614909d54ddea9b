"""Wait on a condition with a deadline: the suite's one way to wait for another process.

Tests never sleep to synchronise (a loaded machine makes any fixed pause too short);
they poll a condition they can observe and fail, naming what they waited for, when the
deadline passes. The deadline bounds a broken test; it is not an assertion about speed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: What to say on a timeout: a fixed text, or a callable that describes the state then
#: (a server log, the values seen so far), evaluated only when the wait fails.
What = str | Callable[[], str]


def _timed_out(timeout_s: float, what: What) -> AssertionError:
    said = what() if callable(what) else what
    return AssertionError(f"timed out after {timeout_s:g} s waiting for {said}")


def wait_until(
    condition: Callable[[], T], timeout_s: float, what: What, *, interval_s: float = 0.05
) -> T:
    """Call `condition` until it returns a truthy value, and return that value.

    Raises AssertionError naming `what` once `timeout_s` has passed; an exception
    raised by `condition` (a server that exited, say) propagates at once.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout_s, what)
        time.sleep(interval_s)  # a polling interval, not synchronisation


async def wait_until_async(
    condition: Callable[[], T], timeout_s: float, what: What, *, interval_s: float = 0.01
) -> T:
    """`wait_until` for a test on an event loop: the loop keeps running between polls."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(timeout_s, what)
        await asyncio.sleep(interval_s)
