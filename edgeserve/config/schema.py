"""Turn a TOML mapping into frozen dataclasses, refusing unknown keys and naming the key at fault.

Each settings section is a frozen dataclass; a field's metadata may carry `min`, `max`
and `choices`. Supported field types: bool, int, float, str, Path, None-able forms of
those, list/tuple of them, nested dataclasses, and dict[str, dataclass].
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

T = TypeVar("T")


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
    if not isinstance(data, dict):
        raise ConfigError(key, f"must be a table, got {_kind(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in data:
        if name not in fields:
            raise ConfigError(_join(key, name), f"unknown key (known: {', '.join(sorted(fields))})")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            continue
        path = _join(key, name)
        value = _convert(hints[name], data[name], path)
        _check(f.metadata, value, path)
        values[name] = value
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(key, str(exc)) from None


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, path)
        for candidate in inner:
            try:
                return _convert(candidate, value, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"has the wrong type ({_kind(value)})")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {_kind(value)}")
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a table, got {_kind(value)}")
        return {k: _convert(args[1], v, _join(path, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return parse_section(tp, value, path)
    if tp is Any:
        return value
    if tp is dict:  # a free-form table, validated by its owner
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a table, got {_kind(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"must be an integer, got {_kind(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {_kind(value)}")
        if not math.isfinite(value):
            raise ConfigError(path, "must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {_kind(value)}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(path, f"must be a non-empty path string, got {_kind(value)}")
        return Path(value)
    raise ConfigError(path, f"unsupported setting type {tp!r}")  # a bug in a settings class


def _check(meta: typing.Mapping[str, Any], value: Any, path: str) -> None:
    if value is None:
        return
    if "min" in meta and value < meta["min"]:
        raise ConfigError(path, f"must be >= {meta['min']}, got {value}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(path, f"must be <= {meta['max']}, got {value}")
    if "choices" in meta and value not in meta["choices"]:
        choices = ", ".join(map(repr, meta["choices"]))
        raise ConfigError(path, f"must be one of {choices}, got {value!r}")


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
