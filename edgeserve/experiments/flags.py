"""Feature flags: a kill switch and a gradual rollout on the same hashing as experiments.

A flag gates an experiment's candidates (`Experiment.flag`) or a whole model (a flag
named `model.<name>`). Changes take effect on the next request; listeners (the audit
log, persistence) hear of each change.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

from edgeserve.errors import InvalidInput
from edgeserve.experiments.assignment import in_rollout

FLAG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Flag:
    name: str
    enabled: bool = True
    rollout_percent: float = 100.0

    def allows(self, unit: str) -> bool:
        return self.enabled and in_rollout(f"flag:{self.name}", unit, self.rollout_percent)


def flag_from_json(name: str, doc: object) -> Flag:
    if not FLAG_NAME.match(name):
        raise InvalidInput("flag names use 1-64 letters, digits, '_', '.', '-'")
    if not isinstance(doc, dict) or set(doc) - {"enabled", "rollout_percent"}:
        raise InvalidInput('a flag is {"enabled": bool, "rollout_percent": 0..100}')
    enabled = doc.get("enabled", True)
    percent = doc.get("rollout_percent", 100.0)
    if not isinstance(enabled, bool):
        raise InvalidInput("'enabled' must be true or false")
    if (
        isinstance(percent, bool)
        or not isinstance(percent, (int, float))
        or not 0 <= percent <= 100
    ):
        raise InvalidInput("'rollout_percent' must be a number from 0 to 100")
    return Flag(name, enabled, float(percent))


class FlagStore:
    """Flags in memory, replaced atomically; readers never lock."""

    def __init__(self, flags: list[Flag] | None = None) -> None:
        self._flags: dict[str, Flag] = {f.name: f for f in flags or []}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[Flag | None, Flag], None]] = []

    def get(self, name: str) -> Flag | None:
        return self._flags.get(name)

    def all(self) -> list[Flag]:
        return sorted(self._flags.values(), key=lambda f: f.name)

    def allows(self, name: str, unit: str) -> bool:
        """True when no such flag exists, or the flag lets this unit in."""
        flag = self._flags.get(name)
        return flag is None or flag.allows(unit)

    def put(self, flag: Flag) -> None:
        with self._lock:
            old = self._flags.get(flag.name)
            self._flags = {**self._flags, flag.name: flag}
        for listener in self._listeners:
            listener(old, flag)

    def on_change(self, listener: Callable[[Flag | None, Flag], None]) -> None:
        self._listeners.append(listener)

    def to_json(self) -> list[dict]:
        return [asdict(f) for f in self.all()]
