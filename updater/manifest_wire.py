"""The manifest as it is written in JSON, checked by pydantic (strict; unknown or missing
fields refused), and pydantic's errors worded as `<field path>: <problem>`.

Only the shape lives here: types, lengths, patterns, ranges, choices. What depends on
more than one field (a sample's data against its shape, device keys and `ephemeral`,
unique file names) and the RFC 3339 times are checked in `updater.manifest`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

MAX_FILES = 64
MAX_SAMPLES = 64
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
SHA256_HEX = r"^[0-9a-f]{64}$"
Backend = Literal["auto", "onnxruntime", "openvino"]
DATATYPES = (
    *("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"),
    *("FP16", "FP32", "FP64", "BF16", "BYTES"),
)
Datatype = Literal[DATATYPES]  # type: ignore[valid-type]
Scheme = Literal["fleet-aes256gcm", "x25519-hkdf-sha256-aes256gcm"]

Text = Annotated[str, Field(max_length=256)]
Time = Annotated[str, Field(max_length=40)]
Dimension = Annotated[int, Field(ge=-1, lt=2**63)]
Count = Annotated[int, Field(ge=0, lt=2**63)]
Values = Annotated[list[Any], Field(max_length=1_000_000)]  # typed per datatype by the caller


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, frozen=True, protected_namespaces=()
    )


class FileWire(_Strict):
    name: Annotated[str, Field(max_length=256, pattern=FILE_NAME)]
    sha256: Annotated[str, Field(max_length=256, pattern=SHA256_HEX)]
    size: Count


class TensorWire(_Strict):
    name: Text
    datatype: Datatype
    shape: Annotated[list[Dimension], Field(max_length=32)]


class SampleTensorWire(_Strict):
    datatype: Datatype
    shape: Annotated[list[Count], Field(max_length=32)]
    data: Values


class ExpectedWire(_Strict):
    data: Values


class SampleWire(_Strict):
    inputs: Annotated[dict[Text, SampleTensorWire], Field(max_length=256)]
    expected: Annotated[dict[Text, ExpectedWire], Field(max_length=256)]
    tolerance: Annotated[float, Field(ge=0)] = 0.0


class DataKeyWire(_Strict):
    scheme: Scheme
    key_id: Text
    nonce: Text
    wrapped: Text
    ephemeral: Text | None = None


class ManifestWire(_Strict):
    format_version: int
    model: Annotated[str, Field(max_length=256, pattern=MODEL_NAME)]
    version: Annotated[int, Field(ge=1, lt=2**63)]
    backend: Backend
    created: Time
    files: Annotated[list[FileWire], Field(max_length=MAX_FILES)]
    inputs: Annotated[list[TensorWire], Field(max_length=256)]
    outputs: Annotated[list[TensorWire], Field(max_length=256)]
    signing_key_id: Text
    data_key: DataKeyWire
    model_config_text: Annotated[str, Field(max_length=1024 * 1024, alias="model_config")]
    samples: Annotated[list[SampleWire], Field(max_length=MAX_SAMPLES)]
    expires: Time = None  # type: ignore[assignment]  # absent: None; present: a string


def check(data: Any) -> ManifestWire:
    """`data` (parsed JSON) as a ManifestWire; ValueError("<path>: <problem>") otherwise."""
    try:
        return ManifestWire.model_validate(data, by_alias=True)
    except pydantic.ValidationError as exc:
        raise ValueError(describe(exc.errors(include_url=False))) from None


def describe(errors: list[Any]) -> str:
    """The first error as `<path>: <problem>`; unknown and missing fields are listed together."""
    for kind, words in (("extra_forbidden", "unknown"), ("missing", "missing")):
        found = [e for e in errors if e["type"] == kind]
        if found:
            parent = found[0]["loc"][:-1]
            names = [str(e["loc"][-1]) for e in found if e["loc"][:-1] == parent]
            if kind == "extra_forbidden":
                names.sort()
            return f"{_path(parent)}: {words} field(s) {', '.join(names)}"
    error = errors[0]
    return f"{_path(error['loc'])}: {_problem(error)}"


def _path(loc: tuple[Any, ...]) -> str:
    if not loc:
        return "(top level)"
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("[key]"):
            continue  # pydantic marks a bad dict key after naming it
        else:
            out += f".{part}" if out else str(part)
    return out


def _problem(error: Any) -> str:
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if kind in _TYPES:
        return f"must be {_TYPES[kind]}, got {_kind(value)}"
    if kind == "too_long":
        what = "an object of" if ctx.get("field_type") == "Dictionary" else "a list of"
        unit = "entries" if ctx.get("field_type") == "Dictionary" else "items"
        return f"must be {what} at most {ctx.get('max_length')} {unit}"
    if kind == "string_too_long":
        return f"must be a string of at most {ctx.get('max_length')} characters"
    if kind == "string_pattern_mismatch":
        return f"{value!r} is not allowed here"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "greater_than_equal":
        return f"must be >= {ctx.get('ge')}, got {value!r}"
    if kind == "less_than":
        return "is too large"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    return str(error["msg"])


_TYPES = {
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dict_type": "an object",
    "list_type": "a list",
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
}


_KINDS: dict[type, str] = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "an object",
}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), "null")
