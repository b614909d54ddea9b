"""An experiment definition as the API, the config and saved state write it, checked by
pydantic (strict; unknown fields refused), and its errors worded for the person who wrote it.

Only the shape lives here: types, patterns, ranges, choices. What spans fields (unique
variant names, weights, increasing stages, shadow mode's two variants) and the defaults
that depend on other fields are in `edgeserve.experiments.model`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

from edgeserve.errors import InvalidInput

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
UNIT = r"^(request_id|header:[A-Za-z0-9-]{1,64}|claim:[A-Za-z0-9_]{1,64})$"
PRIMARY = r"^(accuracy|confidence|event:[A-Za-z0-9_.-]{1,64}|conversion:[A-Za-z0-9_.-]{1,64})$"
FLAG = r"^$|^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
STATUSES = ("active", "paused", "stopped", "concluded")
MODES = ("split", "shadow")

Name = Annotated[str, Field(pattern=NAME)]
Text = Annotated[str, Field(max_length=4096)]


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class VariantDoc(_Strict):
    name: Name
    version: Annotated[int, Field(ge=0, lt=2**63)]
    weight: Annotated[float, Field(ge=0)] = 1.0


class ExperimentDoc(_Strict):
    id: Name
    model: Name
    variants: Annotated[list[VariantDoc], Field(min_length=2, max_length=8)]
    unit: Annotated[str, Field(pattern=UNIT)] = "request_id"
    mode: Literal[MODES] = "split"  # type: ignore[valid-type]
    primary_metric: Annotated[str, Field(pattern=PRIMARY)] = "accuracy"
    max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.05
    max_p99_ms: Annotated[float, Field(ge=0)] = 0.0
    conversion_window_s: Annotated[float, Field(ge=0, le=365 * 86400)] = 0.0
    cuped: bool = True
    correction: Literal["holm", "bh"] = "holm"
    guardrail_margins: dict[Literal["latency_ms", "error_rate"], Annotated[float, Field(ge=0)]] = {}
    auto: bool = False
    stages: list[Annotated[float, Field(gt=0, le=100)]] = []
    stage: Annotated[int, Field(ge=0, lt=2**63)] = 0
    flag: Annotated[str, Field(pattern=FLAG)] = ""
    salt: Text = ""
    status: Literal[STATUSES] = "active"  # type: ignore[valid-type]
    decision: Text = ""
    promoted_version: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    reason: Text = ""
    created: float = 0.0
    history: list[dict[str, Any]] = []  # saved state only
    running_p: dict[str, float] = {}  # saved state only


def check(doc: Any) -> ExperimentDoc:
    """`doc` as an ExperimentDoc; InvalidInput naming the first field at fault otherwise."""
    try:
        return ExperimentDoc.model_validate(doc)
    except pydantic.ValidationError as exc:
        raise InvalidInput(describe(exc.errors(include_url=False))) from None


def describe(errors: list[Any]) -> str:
    """One line for the first error; an unknown top-level field is named before the rest."""
    unknown = sorted(
        str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1
    )
    if unknown:
        return f"unknown experiment field '{unknown[0]}'"
    # the list itself before its items, as a person reads it
    error = next((e for e in errors if tuple(e["loc"]) == ("variants",)), errors[0])
    loc, kind = error["loc"], error["type"]
    if not loc:
        return "an experiment must be a JSON object"
    field = loc[0]
    if field == "variants" and len(loc) >= 2:
        i = loc[1]
        if len(loc) == 2:
            return f"variants[{i}] must be an object"
        if kind == "extra_forbidden":
            return f"variants[{i}]: unknown field '{loc[2]}'"
        return f"variants[{i}].{loc[2]} {_VARIANT[loc[2]]}"
    return _FIELD.get(field, f"'{field}' has an invalid value")


_VARIANT = {
    "name": "must be a short name",
    "version": "must be a version number >= 0",
    "weight": "must be a number >= 0",
}
_FIELD = {
    "id": "'id' must be 1-64 letters, digits, '_', '.', '-'",
    "model": "'model' must be a model name",
    "variants": "'variants' must list 2 to 8 variants (the first is the control)",
    "stages": "'stages' must be increasing percentages in (0, 100]",
    "correction": '\'correction\' must be "holm" or "bh"',
    "guardrail_margins": "'guardrail_margins' maps latency_ms or error_rate to a margin >= 0",
}
