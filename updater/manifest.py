"""The bundle manifest: typed, strictly parsed (unknown or missing fields refused).

The manifest is the only thing the signature covers directly; payload files are
covered through their SHA-256 here. Parsing is pure: bytes in, `Manifest` or
`BundleRejected("bad_manifest", "<field>: <problem>")` out. The JSON shape is checked by
pydantic (`updater.manifest_wire`); what spans fields is checked here.
"""

from __future__ import annotations

import json
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from updater import manifest_wire as wire
from updater.errors import BundleRejected
from updater.wrapping import DEVICE, WrappedKey

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MODEL_NAME = re.compile(wire.MODEL_NAME)
FILE_NAME = re.compile(wire.FILE_NAME)
BACKENDS = typing.get_args(wire.Backend)
DATATYPES = wire.DATATYPES
MAX_FILES = wire.MAX_FILES
MAX_SAMPLES = wire.MAX_SAMPLES
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


def _time(text: str, path: str) -> datetime:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _bad(path, "must be an RFC 3339 time like 2026-01-31T12:00:00Z") from None
    if t.tzinfo is None:
        raise _bad(path, "must carry a time zone (Z or +hh:mm)")
    return t


def _signature(t: wire.TensorWire, path: str) -> TensorSignature:
    """Signature shapes: -1 (any size) or >= 1 per dimension."""
    if 0 in t.shape:
        raise _bad(f"{path}.shape", "dimensions must be -1 (any size) or >= 1")
    return TensorSignature(t.name, t.datatype, tuple(t.shape))


def _scalars(items: list[Any], path: str, datatype: str | None) -> tuple[Scalar, ...]:
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


def _sample(s: wire.SampleWire, path: str) -> ValidationSample:
    inputs: dict[str, SampleTensor] = {}
    for name, t in s.inputs.items():
        p = f"{path}.inputs.{name}"
        data = _scalars(t.data, f"{p}.data", t.datatype)
        if len(data) != math.prod(t.shape):
            raise _bad(f"{p}.data", f"has {len(data)} values, shape {t.shape} needs more/less")
        inputs[name] = SampleTensor(t.datatype, tuple(t.shape), data)
    expected = {
        name: _scalars(e.data, f"{path}.expected.{name}.data", None)
        for name, e in s.expected.items()
    }
    if not inputs or not expected:
        raise _bad(path, "needs at least one input and one expected output")
    return ValidationSample(inputs, expected, float(s.tolerance))


def _data_key(k: wire.DataKeyWire) -> WrappedKey:
    if (k.scheme == DEVICE) != (k.ephemeral is not None):
        raise _bad("data_key.ephemeral", "is required for device keys and only for them")
    return WrappedKey(k.scheme, k.key_id, k.nonce, k.wrapped, k.ephemeral)


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
    if isinstance(data, dict) and "format_version" in data:
        declared = data["format_version"]
        if declared != FORMAT_VERSION or isinstance(declared, bool):
            raise BundleRejected(
                "unsupported_format",
                f"bundle format {declared!r} is not supported (this box reads {FORMAT_VERSION})",
            )
    try:
        m = wire.check(data)
    except ValueError as exc:
        raise BundleRejected("bad_manifest", f"manifest {exc}") from None
    if not m.files:
        raise _bad("files", "must list at least one file")
    if len({f.name for f in m.files}) != len(m.files):
        raise _bad("files", "names must be unique")
    return Manifest(
        model=m.model,
        version=m.version,
        backend=m.backend,
        created=_time(m.created, "created"),
        files=tuple(FileEntry(f.name, f.sha256, f.size) for f in m.files),
        inputs=tuple(_signature(t, f"inputs[{i}]") for i, t in enumerate(m.inputs)),
        outputs=tuple(_signature(t, f"outputs[{i}]") for i, t in enumerate(m.outputs)),
        signing_key_id=m.signing_key_id,
        data_key=_data_key(m.data_key),
        model_config=m.model_config_text,
        samples=tuple(_sample(s, f"samples[{i}]") for i, s in enumerate(m.samples)),
        expires=_time(m.expires, "expires") if m.expires is not None else None,
    )
