"""The bundle manifest: typed, strictly parsed (unknown or missing fields refused).

The manifest is the only thing the signature covers directly; payload files are
covered through their SHA-256 here. Parsing is pure: bytes in, `Manifest` or
`BundleRejected("bad_manifest", "<field>: <problem>")` out.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from updater.errors import BundleRejected
from updater.wrapping import DEVICE, FLEET, WrappedKey

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_FILES = 64
MAX_SAMPLES = 64
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
BACKENDS = ("auto", "onnxruntime", "openvino")
DATATYPES = (
    *("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"),
    *("FP16", "FP32", "FP64", "BF16", "BYTES"),
)
Scalar = int | float | bool | str


@dataclass(frozen=True)
class FileEntry:
    """One payload file: its name in the model folder, SHA-256 and size of the plaintext."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class TensorSignature:
    """A model input or output as the Open Inference Protocol names it (-1: any size)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SampleTensor:
    """One input of a validation sample, in V2 JSON form (flat data, row-major)."""

    datatype: str
    shape: tuple[int, ...]
    data: tuple[Scalar, ...]


@dataclass(frozen=True)
class ValidationSample:
    """Inputs to run and the outputs they must give, within `tolerance` (absolute)."""

    inputs: Mapping[str, SampleTensor]
    expected: Mapping[str, tuple[Scalar, ...]]
    tolerance: float = 0.0


@dataclass(frozen=True)
class Manifest:
    """What a bundle claims; trustworthy only once its signature has been checked."""

    model: str
    version: int
    backend: str
    created: datetime
    files: tuple[FileEntry, ...]
    inputs: tuple[TensorSignature, ...]
    outputs: tuple[TensorSignature, ...]
    signing_key_id: str
    data_key: WrappedKey
    model_config: str = ""
    samples: tuple[ValidationSample, ...] = ()
    expires: datetime | None = None
    format_version: int = FORMAT_VERSION

    def file(self, name: str) -> FileEntry:
        return next(f for f in self.files if f.name == name)

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON-ready data (the same shape `parse_manifest` reads)."""
        out: dict[str, Any] = {
            "format_version": self.format_version,
            "model": self.model,
            "version": self.version,
            "backend": self.backend,
            "created": _rfc3339(self.created),
            "files": [asdict(f) for f in self.files],
            "inputs": [_tensor_json(t) for t in self.inputs],
            "outputs": [_tensor_json(t) for t in self.outputs],
            "signing_key_id": self.signing_key_id,
            "data_key": {k: v for k, v in asdict(self.data_key).items() if v is not None},
            "model_config": self.model_config,
            "samples": [_sample_json(s) for s in self.samples],
        }
        if self.expires is not None:
            out["expires"] = _rfc3339(self.expires)
        return out


def encode_manifest(manifest: Manifest) -> bytes:
    """Canonical bytes to sign: sorted keys, no spaces, UTF-8."""
    return json.dumps(manifest.to_json(), sort_keys=True, separators=(",", ":")).encode()


def _rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _tensor_json(t: TensorSignature) -> dict[str, Any]:
    return {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}


def _sample_json(s: ValidationSample) -> dict[str, Any]:
    return {
        "inputs": {
            n: {"datatype": t.datatype, "shape": list(t.shape), "data": list(t.data)}
            for n, t in s.inputs.items()
        },
        "expected": {n: {"data": list(d)} for n, d in s.expected.items()},
        "tolerance": s.tolerance,
    }


# -- strict parsing -------------------------------------------------------------------


def _bad(path: str, problem: str) -> BundleRejected:
    return BundleRejected("bad_manifest", f"manifest {path}: {problem}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _bad(k, "appears twice")
        out[k] = v
    return out


def _reject_constant(name: str) -> Any:
    raise _bad("", f"{name} is not allowed")


def _object(
    value: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(path, "must be an object")
    unknown = sorted(set(value) - set(required) - set(optional))
    if unknown:
        raise _bad(path, f"unknown field(s) {', '.join(unknown)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise _bad(path, f"missing field(s) {', '.join(missing)}")
    return value


def _mapping(value: Any, path: str, max_len: int = 256) -> dict[str, Any]:
    """An object whose keys are names chosen by the author (tensor names)."""
    if not isinstance(value, dict) or len(value) > max_len:
        raise _bad(path, f"must be an object of at most {max_len} entries")
    return value


def _str(value: Any, path: str, pattern: re.Pattern[str] | None = None, max_len: int = 256) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise _bad(path, f"must be a string of at most {max_len} characters")
    if pattern is not None and not pattern.match(value):
        raise _bad(path, f"{value!r} is not allowed here")
    return value


def _int(value: Any, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(path, f"must be an integer >= {minimum}")
    if value >= 2**63:
        raise _bad(path, "is too large")
    return value


def _list(value: Any, path: str, max_len: int) -> list[Any]:
    if not isinstance(value, list) or len(value) > max_len:
        raise _bad(path, f"must be a list of at most {max_len} items")
    return value


def _time(value: Any, path: str) -> datetime:
    text = _str(value, path, max_len=40)
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _bad(path, "must be an RFC 3339 time like 2026-01-31T12:00:00Z") from None
    if t.tzinfo is None:
        raise _bad(path, "must carry a time zone (Z or +hh:mm)")
    return t


def _choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise _bad(path, f"must be one of {', '.join(choices)}")
    return value


def _shape(value: Any, path: str, concrete: bool) -> tuple[int, ...]:
    """Signature shapes: -1 (any) or >= 1 per dimension; sample shapes: concrete, >= 0."""
    dims = _list(value, path, 32)
    out = tuple(_int(d, f"{path}[{i}]", 0 if concrete else -1) for i, d in enumerate(dims))
    if not concrete and 0 in out:
        raise _bad(path, "dimensions must be -1 (any size) or >= 1")
    return out


def _tensor(value: Any, path: str) -> TensorSignature:
    obj = _object(value, path, ("name", "datatype", "shape"))
    return TensorSignature(
        _str(obj["name"], f"{path}.name"),
        _choice(obj["datatype"], f"{path}.datatype", DATATYPES),
        _shape(obj["shape"], f"{path}.shape", concrete=False),
    )


def _scalars(value: Any, path: str, datatype: str | None) -> tuple[Scalar, ...]:
    items = _list(value, path, 1_000_000)
    for i, v in enumerate(items):
        if datatype == "BYTES":
            ok = isinstance(v, str)
        elif datatype == "BOOL":
            ok = isinstance(v, bool)
        elif datatype is None:
            ok = isinstance(v, (bool, str)) or (isinstance(v, (int, float)) and math.isfinite(v))
        else:
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        if not ok:
            raise _bad(f"{path}[{i}]", f"is not a valid {datatype or 'value'}")
    return tuple(items)


def _sample(value: Any, path: str) -> ValidationSample:
    obj = _object(value, path, ("inputs", "expected"), ("tolerance",))
    inputs: dict[str, SampleTensor] = {}
    for name, raw in _mapping(obj["inputs"], f"{path}.inputs").items():
        p = f"{path}.inputs.{name}"
        t = _object(raw, p, ("datatype", "shape", "data"))
        datatype = _choice(t["datatype"], f"{p}.datatype", DATATYPES)
        shape = _shape(t["shape"], f"{p}.shape", concrete=True)
        data = _scalars(t["data"], f"{p}.data", datatype)
        if len(data) != math.prod(shape):
            raise _bad(f"{p}.data", f"has {len(data)} values, shape {list(shape)} needs more/less")
        inputs[_str(name, p)] = SampleTensor(datatype, shape, data)
    expected = {
        _str(name, f"{path}.expected.{name}"): _scalars(
            _object(raw, f"{path}.expected.{name}", ("data",))["data"],
            f"{path}.expected.{name}.data",
            None,
        )
        for name, raw in _mapping(obj["expected"], f"{path}.expected").items()
    }
    if not inputs or not expected:
        raise _bad(path, "needs at least one input and one expected output")
    tolerance = obj.get("tolerance", 0.0)
    if (
        isinstance(tolerance, bool)
        or not isinstance(tolerance, (int, float))
        or not math.isfinite(tolerance)
        or tolerance < 0
    ):
        raise _bad(f"{path}.tolerance", "must be a finite number >= 0")
    return ValidationSample(inputs, expected, float(tolerance))


def _data_key(value: Any, path: str) -> WrappedKey:
    obj = _object(value, path, ("scheme", "key_id", "nonce", "wrapped"), ("ephemeral",))
    scheme = _choice(obj["scheme"], f"{path}.scheme", (FLEET, DEVICE))
    ephemeral = obj.get("ephemeral")
    if (scheme == DEVICE) != (ephemeral is not None):
        raise _bad(f"{path}.ephemeral", "is required for device keys and only for them")
    return WrappedKey(
        scheme,
        _str(obj["key_id"], f"{path}.key_id"),
        _str(obj["nonce"], f"{path}.nonce"),
        _str(obj["wrapped"], f"{path}.wrapped"),
        None if ephemeral is None else _str(ephemeral, f"{path}.ephemeral"),
    )


SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_REQUIRED = (
    "format_version",
    "model",
    "version",
    "backend",
    "created",
    "files",
    "inputs",
    "outputs",
    "signing_key_id",
    "data_key",
    "model_config",
    "samples",
)


def parse_manifest(raw: bytes) -> Manifest:
    """Strictly parse manifest bytes; any fault is `BundleRejected("bad_manifest", ...)`."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _bad("", f"is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("", "is not valid UTF-8 JSON") from None
    obj = _object(data, "(top level)", _REQUIRED, ("expires",))
    if obj["format_version"] != FORMAT_VERSION or isinstance(obj["format_version"], bool):
        raise BundleRejected(
            "unsupported_format",
            f"bundle format {obj['format_version']!r} is not supported (this box reads "
            f"{FORMAT_VERSION})",
        )
    files = tuple(
        FileEntry(
            _str(f["name"], f"files[{i}].name", FILE_NAME),
            _str(f["sha256"], f"files[{i}].sha256", SHA256_HEX),
            _int(f["size"], f"files[{i}].size", 0),
        )
        for i, f in enumerate(
            _object(x, f"files[{j}]", ("name", "sha256", "size"))
            for j, x in enumerate(_list(obj["files"], "files", MAX_FILES))
        )
    )
    if not files:
        raise _bad("files", "must list at least one file")
    if len({f.name for f in files}) != len(files):
        raise _bad("files", "names must be unique")
    return Manifest(
        model=_str(obj["model"], "model", MODEL_NAME),
        version=_int(obj["version"], "version", 1),
        backend=_choice(obj["backend"], "backend", BACKENDS),
        created=_time(obj["created"], "created"),
        files=files,
        inputs=tuple(
            _tensor(t, f"inputs[{i}]") for i, t in enumerate(_list(obj["inputs"], "inputs", 256))
        ),
        outputs=tuple(
            _tensor(t, f"outputs[{i}]") for i, t in enumerate(_list(obj["outputs"], "outputs", 256))
        ),
        signing_key_id=_str(obj["signing_key_id"], "signing_key_id"),
        data_key=_data_key(obj["data_key"], "data_key"),
        model_config=_str(obj["model_config"], "model_config", max_len=1024 * 1024),
        samples=tuple(
            _sample(s, f"samples[{i}]")
            for i, s in enumerate(_list(obj["samples"], "samples", MAX_SAMPLES))
        ),
        expires=_time(obj["expires"], "expires") if "expires" in obj else None,
    )
