"""Named crash points for the crash tests: SIGKILL ourselves where the env var says.

`UPDATER_CRASH_AT=<name>` kills the process at that point; `UPDATER_CRASH_SKIP=<n>`
lets the first n hits pass (to crash in the middle of a loop). Unset, it costs one
dict lookup, so the hooks stay in production code where the real steps are.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "UPDATER_CRASH_AT"
SKIP_ENV = "UPDATER_CRASH_SKIP"

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die with SIGKILL (no cleanup, no flush) if the crash test asked for `name`."""
    if os.environ.get(CRASH_ENV) != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] > int(os.environ.get(SKIP_ENV, "0")):
        os.kill(os.getpid(), signal.SIGKILL)
