"""Which version serves a request: the experiment assignment on the request path.

Pure and cheap: a dictionary lookup for the model's active experiment, one SHA-256 of
the unit id, a walk over a few ranges.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from edgeserve.experiments.assignment import assign
from edgeserve.experiments.flags import FlagStore, model_flag
from edgeserve.experiments.model import Experiment, Variant


@dataclass(frozen=True, slots=True)
class Routing:
    version: int | None  # None: no experiment, serve the default version
    experiment: str | None = None
    variant: str | None = None
    shadow: Variant | None = None  # a candidate that gets a copy of the request
    unit: str | None = None  # the experiment's unit id, recorded (hashed) as the subject


NO_EXPERIMENT = Routing(None)


class ExperimentRouter:
    """Holds the active experiment per model; `route` assigns a request to a variant."""

    def __init__(self, flags: FlagStore) -> None:
        self.flags = flags
        self._active: dict[str, Experiment] = {}

    def publish(self, experiments: list[Experiment]) -> None:
        """Replace the routing table (called whenever an experiment changes)."""
        self._active = {e.model: e for e in experiments if e.status == "active"}

    def model_allowed(self, model: str, unit: str) -> bool:
        return self.flags.allows(model_flag(model), unit)

    def route(self, model: str, unit_of: Callable[[str], str | None]) -> Routing:
        exp = self._active.get(model)
        if exp is None:
            return NO_EXPERIMENT
        unit = unit_of(exp.unit)
        control = exp.variants[0]
        if unit is None:  # no unit id: the control, outside the experiment
            return Routing(control.version)
        if exp.flag and not self.flags.allows(exp.flag, unit):
            # held back by the flag: served the control, but not in the experiment (its
            # control would otherwise hold every unit outside the rollout)
            return Routing(control.version)
        chosen = assign(exp.salt, unit, exp.weights, exp.mode)
        served = exp.variants[chosen.serve]
        shadow = exp.variants[chosen.shadow] if chosen.shadow is not None else None
        recorded = None if exp.unit == "request_id" else unit
        return Routing(served.version, exp.id, served.name, shadow, recorded)
