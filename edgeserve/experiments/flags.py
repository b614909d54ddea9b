"""Feature flags: a kill switch and a gradual rollout on the same hashing as experiments.

A flag gates an experiment's candidates (`Experiment.flag`) or a whole model (a flag
named `model.<name>`). Changes take effect on the next request; listeners (the audit
log, persistence) hear of each change.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

from edgeserve.errors import InvalidInput
from edgeserve.experiments.assignment import in_rollout

log = logging.getLogger(__name__)

FLAG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Flag:
    """A named switch: off for everyone when disabled, else on for `rollout_percent` of
    units, chosen by the same hashing as experiments (salt "flag:<name>")."""

    name: str
    enabled: bool = True
    rollout_percent: float = 100.0

    def allows(self, unit: str) -> bool:
        return self.enabled and in_rollout(f"flag:{self.name}", unit, self.rollout_percent)


def flag_from_json(name: str, doc: object, current: Flag | None = None) -> Flag:
    """A flag from its JSON; fields left out keep `current`'s values (or the defaults)."""
    if not FLAG_NAME.match(name):
        raise InvalidInput("flag names use 1-64 letters, digits, '_', '.', '-'")
    if not isinstance(doc, dict) or set(doc) - {"enabled", "rollout_percent"}:
        raise InvalidInput('a flag is {"enabled": bool, "rollout_percent": 0..100}')
    base = current or Flag(name)
    enabled = doc.get("enabled", base.enabled)
    percent = doc.get("rollout_percent", base.rollout_percent)
    if not isinstance(enabled, bool):
        raise InvalidInput("'enabled' must be true or false")
    if (
        isinstance(percent, bool)
        or not isinstance(percent, (int, float))
        or not 0 <= percent <= 100
    ):
        raise InvalidInput("'rollout_percent' must be a number from 0 to 100")
    return Flag(name, enabled, float(percent))


def model_flag(model: str) -> str:
    """The name of the flag that gates a whole model."""
    return f"model.{model}"


Listener = Callable[[Flag | None, Flag | None], None]


class FlagStore:
    """Flags in memory, updated while serving with no restart.

    Readers never lock: the table is a dict replaced whole on each change, so a request
    sees either the old or the new flag. Writers serialise on a lock and tell the
    listeners (audit log, persistence) under it, so listeners hear changes in the order
    they took effect; a listener may read the store, and one that fails is logged and
    does not stop the others.
    """

    def __init__(self, flags: list[Flag] | None = None) -> None:
        self._flags: dict[str, Flag] = {f.name: f for f in flags or []}
        self._lock = threading.RLock()
        self._listeners: tuple[Listener, ...] = ()

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
            self._tell(old, flag)

    def set_enabled(self, name: str, enabled: bool) -> Flag:
        """The kill switch: off stops the flag for every unit at the next request."""
        with self._lock:
            old = self._flags.get(name) or Flag(name)
            flag = replace(old, enabled=enabled)
            self.put(flag)
            return flag

    def set_rollout(self, name: str, percent: float) -> Flag:
        """Gradual rollout: units below `percent` on the flag's hash line are in; raising
        it only adds units, lowering it only removes them."""
        if not 0 <= percent <= 100:
            raise InvalidInput("'rollout_percent' must be a number from 0 to 100")
        with self._lock:
            flag = replace(self._flags.get(name) or Flag(name), rollout_percent=float(percent))
            self.put(flag)
            return flag

    def remove(self, name: str) -> bool:
        """Forget a flag (what it gated is then allowed); False if there was none."""
        with self._lock:
            old = self._flags.get(name)
            if old is None:
                return False
            self._flags = {k: v for k, v in self._flags.items() if k != name}
            self._tell(old, None)
            return True

    def on_change(self, listener: Listener) -> None:
        """Call `listener(old, new)` after each change; None stands for absent."""
        with self._lock:
            self._listeners = (*self._listeners, listener)

    def _tell(self, old: Flag | None, new: Flag | None) -> None:
        for listener in self._listeners:
            try:
                listener(old, new)
            except Exception:
                log.exception("flag listener failed flag=%s", (new or old).name)  # type: ignore[union-attr]

    def to_json(self) -> list[dict]:
        return [asdict(f) for f in self.all()]
