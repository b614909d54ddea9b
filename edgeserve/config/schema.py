"""Turn a TOML mapping into frozen dataclasses, refusing unknown keys and naming the key at fault.

Each settings section is a frozen dataclass; a field's metadata may carry `min`, `max`
and `choices`. pydantic (v2, strict mode) does the checking: each dataclass is compiled
once into a pydantic model whose errors carry a location, a kind and the bad value, which
this module turns into one line naming the dotted key. The dataclass is then built from
the checked values, so its `__post_init__` checks still run. Supported field types: bool,
int, float, str, Path, None-able forms of those, list/tuple of them, nested dataclasses,
dict[str, dataclass], dict (free-form) and Any.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union

import pydantic
from pydantic_core import PydanticCustomError

T = TypeVar("T")

_CONFIG = pydantic.ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ConfigError(ValueError):
    """A config value is wrong; `key` is the dotted path to it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


def setting(default: Any = dataclasses.MISSING, **checks: Any) -> Any:
    """A dataclass field with validation metadata (min, max, choices)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=checks)
    return dataclasses.field(default=default, metadata=checks)


def parse_section(cls: type[T], data: Any, key: str) -> T:
    """Build dataclass `cls` from `data`, a mapping from TOML; raise ConfigError on any fault."""
    model = _model(cls)  # type: ignore[arg-type]  # a class is hashable
    try:
        checked = model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise _config_error(exc, cls, key) from None
    return _build(cls, checked, key)


# -- compiling a dataclass into a pydantic model (once per class) ----------------------------


@functools.cache
def _model(cls: type) -> type[pydantic.BaseModel]:
    hints = _hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = _field_type(hints[f.name])
        if f.metadata:
            tp = Annotated[tp, pydantic.AfterValidator(functools.partial(_check, f.metadata))]
        fields[f.name] = (tp, None)  # defaults stay the dataclass's own
    model = pydantic.create_model(  # type: ignore[call-overload]
        f"{cls.__name__}Schema", __config__=_CONFIG, **fields
    )
    return model


def _field_type(tp: Any) -> Any:
    """The pydantic type that checks what a TOML value for `tp` must look like."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return Union[tuple(_field_type(a) for a in args)]  # noqa: UP007
    if origin is typing.Literal:
        return tp
    if origin in (list, tuple):
        return list[_field_type(args[0]) if args else Any]  # type: ignore[misc]  # built at run time
    if origin is dict:
        return dict[str, _field_type(args[1])]  # type: ignore[misc]  # built at run time
    if dataclasses.is_dataclass(tp):
        return _model(tp)  # type: ignore[arg-type]
    if tp is Any:
        return Any
    if tp is dict:  # a free-form table, validated by its owner
        return dict[str, Any]
    if tp is Path:
        return Annotated[str, pydantic.AfterValidator(_non_empty_path)]
    if tp in (bool, int, float, str, type(None)):
        return tp
    raise TypeError(f"unsupported setting type {tp!r}")  # a bug in a settings class


def _check(meta: typing.Mapping[str, Any], value: Any) -> Any:
    if value is None:
        return value
    # min and max bound numbers only: a word the field also takes ("auto") is its Literal's
    numeric = not isinstance(value, str)
    if numeric and "min" in meta and value < meta["min"]:
        raise PydanticCustomError("setting", f"must be >= {meta['min']}, got {value}")
    if numeric and "max" in meta and value > meta["max"]:
        raise PydanticCustomError("setting", f"must be <= {meta['max']}, got {value}")
    if "choices" in meta and value not in meta["choices"]:
        choices = ", ".join(map(repr, meta["choices"]))
        raise PydanticCustomError("setting", f"must be one of {choices}, got {value!r}")
    return value


def _non_empty_path(value: str) -> str:
    if not value:
        raise PydanticCustomError("path", "must be a non-empty path string, got a string")
    return value


# -- building the dataclasses from the checked model --------------------------------------------


def _build(cls: type[T], checked: pydantic.BaseModel, key: str) -> T:
    hints = _hints(cls)
    values = {
        name: _value(hints[name], getattr(checked, name), _join(key, name))
        for name in checked.model_fields_set
    }
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in values and f.default is f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(key, f.name), "is required")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, str(exc)) from None


def _value(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if origin in (Union, types.UnionType):
        # the first member the checked value fits, as the TOML value was matched
        for candidate in args:
            if candidate is type(None):
                continue
            if (
                isinstance(candidate, type)
                and dataclasses.is_dataclass(candidate)
                and isinstance(value, pydantic.BaseModel)
            ):
                return _build(candidate, value, path)
            if candidate is Path and isinstance(value, str):
                return Path(value)
            if isinstance(candidate, type) and isinstance(value, candidate):
                return value
        return value
    if origin in (list, tuple):
        item = args[0] if args else Any
        items = [_value(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        return {k: _value(args[1], v, _join(path, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)  # type: ignore[arg-type]
    if tp is Path:
        return Path(value)
    return value


# -- one line naming the key ----------------------------------------------------------------------

_TYPE_PROBLEMS = {
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
}


def _config_error(exc: pydantic.ValidationError, cls: type, key: str) -> ConfigError:
    """The first error of `exc` as a ConfigError naming the dotted key and the bad value."""
    errors = exc.errors(include_url=False)
    error = errors[0]
    path, tp = key, cls
    for part in error["loc"]:
        if isinstance(part, int):
            path, tp = f"{path}[{part}]", _item_type(tp)
        elif dataclasses.is_dataclass(_bare(tp)) and part in _hints(_bare(tp)):
            path, tp = _join(path, part), _hints(_bare(tp))[part]
        elif typing.get_origin(_bare(tp)) is dict:
            path, tp = _join(path, part), _item_type(tp)
        elif error["type"] == "extra_forbidden" and part == error["loc"][-1]:
            path = _join(path, part)
        # anything else is pydantic naming the union member it tried: not part of the key
    kind = error["type"]
    value = error.get("input")
    choices = _union_choices(tp)
    if choices and (kind in _TYPE_PROBLEMS or kind == "literal_error"):
        got = repr(value) if isinstance(value, str) else _kind(value)
        return ConfigError(path, f"must be {choices}, got {got}")
    if kind == "extra_forbidden":
        known = ", ".join(sorted(f.name for f in dataclasses.fields(_bare(tp))))
        return ConfigError(path, f"unknown key (known: {known})")
    if kind in ("setting", "path"):
        return ConfigError(path, error["msg"])
    if kind == "finite_number":
        return ConfigError(path, "must be a finite number")
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return ConfigError(path, f"must be one of {expected}, got {value!r}")
    if kind == "string_type" and _bare(tp) is Path:
        return ConfigError(path, f"must be a non-empty path string, got {_kind(value)}")
    if kind in _TYPE_PROBLEMS:
        return ConfigError(path, f"{_TYPE_PROBLEMS[kind]}, got {_kind(value)}")
    if kind == "missing":
        return ConfigError(path, "is required")
    return ConfigError(path, error["msg"])


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _bare(tp: Any) -> Any:
    """`tp` without `| None`."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


def _union_choices(tp: Any) -> str:
    """'an integer or "auto"' for `int | Literal["auto"]`; "" for any other type, whose
    errors pydantic already words as one expectation."""
    bare = _bare(tp)
    if typing.get_origin(bare) not in (Union, types.UnionType):
        return ""
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    said = []
    for member in typing.get_args(bare):
        if typing.get_origin(member) is typing.Literal:
            said += [json.dumps(v) for v in typing.get_args(member)]
        elif member in words:
            said.append(words[member])
        else:
            return ""
    return " or ".join(said)


def _item_type(tp: Any) -> Any:
    bare = _bare(tp)
    args = typing.get_args(bare)
    if not args:
        return Any
    return args[0] if typing.get_origin(bare) in (list, tuple) else args[-1]


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _kind(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)
