"""What an experiment is: a model, variants (versions with weights), a unit, a mode,
the metrics that decide it, and where it stands."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from edgeserve.errors import InvalidInput

STATUSES = ("active", "paused", "stopped", "concluded")
MODES = ("split", "shadow")
UNIT = re.compile(r"^(request_id|header:[A-Za-z0-9-]{1,64}|claim:[A-Za-z0-9_]{1,64})$")
PRIMARY = re.compile(
    r"^(accuracy|confidence|event:[A-Za-z0-9_.-]{1,64}|conversion:[A-Za-z0-9_.-]{1,64})$"
)
EXPERIMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


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


# Fields whose default is None: saved state writes them as null.
_OPTIONAL = {name: f.default is None for name, f in Experiment.__dataclass_fields__.items()}


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


def parse_definition(doc: Any) -> Experiment:
    """Check a definition's shape and values without knowing which models are loaded,
    so the config can be refused at start-up, before any model is read.

    The salt defaults to the id: assignment then survives the loss of saved state, and
    a new experiment gets new buckets by taking a new id (or an explicit salt)."""
    if not isinstance(doc, dict):
        raise InvalidInput("an experiment must be a JSON object")
    allowed = {f for f in Experiment.__dataclass_fields__}
    unknown = set(doc) - allowed
    if unknown:
        raise InvalidInput(f"unknown experiment field '{sorted(unknown)[0]}'")
    exp_id = doc.get("id")
    if not isinstance(exp_id, str) or not EXPERIMENT_ID.match(exp_id):
        raise InvalidInput("'id' must be 1-64 letters, digits, '_', '.', '-'")
    model = doc.get("model")
    if not isinstance(model, str) or not EXPERIMENT_ID.match(model):
        raise InvalidInput("'model' must be a model name")
    raw_variants = doc.get("variants")
    if not isinstance(raw_variants, list) or not 2 <= len(raw_variants) <= 8:
        raise InvalidInput("'variants' must list 2 to 8 variants (the first is the control)")
    variants = []
    for i, raw in enumerate(raw_variants):
        if not isinstance(raw, dict):
            raise InvalidInput(f"variants[{i}] must be an object")
        extra = set(raw) - {"name", "version", "weight"}
        if extra:
            raise InvalidInput(f"variants[{i}]: unknown field '{sorted(extra)[0]}'")
        name, version, weight = raw.get("name"), raw.get("version"), raw.get("weight", 1)
        if not isinstance(name, str) or not EXPERIMENT_ID.match(name):
            raise InvalidInput(f"variants[{i}].name must be a short name")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise InvalidInput(f"variants[{i}].version must be a version number >= 0")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise InvalidInput(f"variants[{i}].weight must be a number >= 0")
        variants.append(Variant(name, version, float(weight)))
    if len({v.name for v in variants}) != len(variants):
        raise InvalidInput("variant names must be unique")
    if sum(v.weight for v in variants) <= 0:
        raise InvalidInput("variant weights must not all be 0")
    exp = Experiment(id=exp_id, model=str(model), variants=variants)
    for key, kind, check in (
        ("unit", str, lambda v: bool(UNIT.match(v))),
        ("mode", str, lambda v: v in MODES),
        ("primary_metric", str, lambda v: bool(PRIMARY.match(v))),
        ("max_error_rate", float, lambda v: 0 <= v <= 1),
        ("max_p99_ms", float, lambda v: v >= 0),
        ("auto", bool, lambda v: True),
        ("flag", str, lambda v: v == "" or bool(EXPERIMENT_ID.match(v))),
        ("status", str, lambda v: v in STATUSES),
        ("decision", str, lambda v: True),
        ("reason", str, lambda v: True),
        ("salt", str, lambda v: True),
        ("stage", int, lambda v: v >= 0),
        ("promoted_version", int, lambda v: v >= 0),
        ("created", float, lambda v: True),
    ):
        if key not in doc or (doc[key] is None and _OPTIONAL.get(key, False)):
            continue  # null stands for the default of a field that defaults to None
        value = doc[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (
            not isinstance(value, kind)
            or (kind is not bool and isinstance(value, bool))
            or not check(value)
        ):
            raise InvalidInput(f"'{key}' has an invalid value")
        setattr(exp, key, value)
    stages = doc.get("stages", [])
    if (
        not isinstance(stages, list)
        or any(
            isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 100
            for s in stages
        )
        or stages != sorted(stages)
    ):
        raise InvalidInput("'stages' must be increasing percentages in (0, 100]")
    exp.stages = [float(s) for s in stages]
    exp.history = list(doc.get("history", []))
    exp.running_p = dict(doc.get("running_p", {}))
    if exp.mode == "shadow" and len(variants) != 2:
        raise InvalidInput("shadow mode takes exactly two variants: control and candidate")
    if not exp.salt:
        exp.salt = exp.id
    if not exp.created:
        exp.created = time.time()
    if exp.stages and "variants" in doc and exp.stage < len(exp.stages) and not doc.get("history"):
        exp.set_candidate_share(exp.stages[exp.stage])
    return exp
