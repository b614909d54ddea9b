"""What an experiment is: a model, variants (versions with weights), a unit, a mode,
the metrics that decide it, and where it stands. The document's shape is checked in
`edgeserve.experiments.document` (pydantic); what spans fields is checked here."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeserve.errors import InvalidInput
from edgeserve.experiments import document


@dataclass
class Variant:
    name: str
    version: int
    weight: float


@dataclass
class Experiment:
    """One experiment; variants[0] is the control, the others candidates."""

    id: str
    model: str
    variants: list[Variant]
    unit: str = "request_id"
    mode: str = "split"
    primary_metric: str = "accuracy"
    max_error_rate: float = 0.05  # absolute guardrail on a candidate
    max_p99_ms: float = 0.0  # absolute guardrail; 0 = off
    conversion_window_s: float = 0.0  # KPI events count this long after exposure; 0 = no end
    cuped: bool = True  # adjust an event: KPI with each unit's events before exposure
    correction: str = "holm"  # "holm" | "bh": multiple candidates on the primary metric
    # guardrail -> non-inferiority margin in its unit (latency_ms: ms, error_rate: a rate)
    guardrail_margins: dict[str, float] = field(default_factory=dict)
    auto: bool = False
    stages: list[float] = field(default_factory=list)  # candidate % per stage, e.g. 5,25,50,100
    stage: int = 0
    flag: str = ""  # a feature flag gating the candidates (kill switch / rollout)
    salt: str = ""
    status: str = "active"
    decision: str = ""  # "", "promoted", "rolled_back", "stopped"
    promoted_version: int | None = None  # the winner, once promoted; applied again at start-up
    reason: str = ""
    created: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    running_p: dict[str, float] = field(default_factory=dict)  # running minimum per metric

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def weights(self) -> list[float]:
        return [v.weight for v in self.variants]

    def note(self, event: str, reason: str = "") -> None:
        self.history.append({"time": time.time(), "event": event, "reason": reason})

    def set_candidate_share(self, percent: float) -> None:
        """Give the candidates `percent` of traffic together, the control the rest.

        With one candidate (at the end of the line) its range only grows as `percent`
        rises, so no unit leaves it; with several, the boundaries between candidates
        shift and some units move from one candidate to another."""
        share = percent / max(len(self.variants) - 1, 1)
        self.variants[0].weight = 100.0 - percent
        for v in self.variants[1:]:
            v.weight = share


def experiment_from_json(doc: Any, *, known_models: dict[str, list[int]]) -> Experiment:
    """Validate a definition (API body, config table or saved state) against the loaded
    models; errors name the field."""
    exp = parse_definition(doc)
    if exp.model not in known_models:
        raise InvalidInput(f"'model': unknown model {exp.model[:64]!r}")
    for i, variant in enumerate(exp.variants):
        if variant.version not in known_models[exp.model]:
            raise InvalidInput(
                f"variants[{i}].version: model {exp.model} has no version {variant.version!r}"
            )
    return exp


def check_new(exp: Experiment) -> None:
    """What a new definition (API or config) must also satisfy; saved state made by an
    older version is loaded as it is.

    A KPI (event: or conversion:) is counted per unit, from the unit's exposure. With
    unit = "request_id" each request is randomised on its own, so one user meets several
    variants and none of them can be credited with the user's later event: refused here
    rather than reported empty (or, joined on the subject header, credited to every
    variant the user met, which breaks the test's independence)."""
    if exp.unit == "request_id" and exp.primary_metric.startswith(("event:", "conversion:")):
        raise InvalidInput(
            f"'unit': primary_metric {exp.primary_metric!r} needs a unit that names a user "
            '("header:<name>" or "claim:<name>", the one events are sent with); '
            'unit = "request_id" randomises each request, so its events have no variant'
        )


def parse_definition(doc: Any) -> Experiment:
    """Check a definition's shape and values without knowing which models are loaded,
    so the config can be refused at start-up, before any model is read.

    The salt defaults to the id: assignment then survives the loss of saved state, and
    a new experiment gets new buckets by taking a new id (or an explicit salt)."""
    checked = document.check(doc)
    variants = [Variant(v.name, v.version, v.weight) for v in checked.variants]
    if len({v.name for v in variants}) != len(variants):
        raise InvalidInput("variant names must be unique")
    if sum(v.weight for v in variants) <= 0:
        raise InvalidInput("variant weights must not all be 0")
    if checked.stages != sorted(checked.stages):
        raise InvalidInput("'stages' must be increasing percentages in (0, 100]")
    fields = checked.model_dump(exclude={"variants"})
    exp = Experiment(**fields, variants=variants)
    if exp.mode == "shadow" and len(variants) != 2:
        raise InvalidInput("shadow mode takes exactly two variants: control and candidate")
    if not exp.salt:
        exp.salt = exp.id
    if not exp.created:
        exp.created = time.time()
    if exp.stages and exp.stage < len(exp.stages) and not exp.history:
        exp.set_candidate_share(exp.stages[exp.stage])
    return exp
