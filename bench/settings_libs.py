"""Which validation library for settings, experiments and manifests: msgspec or pydantic v2.

    python -m bench.settings_libs [--repeat 7] [--parses 200]

Prints, per library: import time and the RSS the import adds (fresh interpreters, median),
the time to compile the settings classes and parse the shipped `edgeserve.toml` plus every
`models/*/model.toml` the first time (what a start-up pays) and after that, and the time
to turn one experiment document and one bundle manifest into their dataclasses. Both
libraries get the same job: strict types, unknown keys refused, min/max/choices checked.
Ends with the message each gives for the same broken model.toml. A benchmark: it asserts
nothing; on a loaded box the figures are indicative. msgspec is not a dependency: install
it next to the locked environment to compare (`pip install msgspec`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Union

import tomllib

ROOT = Path(__file__).resolve().parent.parent
HAVE_MSGSPEC = importlib.util.find_spec("msgspec") is not None

_IMPORT = """
import sys, time
def rss_kb():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS:'):
            return int(line.split()[1])
before = rss_kb()
t0 = time.perf_counter()
import {module}
took = time.perf_counter() - t0
print(took, rss_kb() - before)
"""


def import_cost(module: str, repeat: int) -> tuple[float, float]:
    """(median ms, median MiB of RSS added) for `import module` in a fresh interpreter."""
    ms, mib = [], []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", _IMPORT.format(module=module)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        ms.append(float(out[0]) * 1000)
        mib.append(int(out[1]) / 1024)
    return statistics.median(ms), statistics.median(mib)


def shipped_toml() -> list[tuple[str, dict[str, Any]]]:
    docs = [("edgeserve.toml", tomllib.loads((ROOT / "edgeserve.toml").read_text()))]
    for path in sorted((ROOT / "models").glob("*/model.toml")):
        docs.append((f"models.{path.parent.name}", tomllib.loads(path.read_text())))
    return docs


# -- msgspec: the same job as edgeserve/config/schema.py, compiled to msgspec Structs -------


def _msgspec_engine() -> Any:
    import msgspec

    @functools.cache
    def struct(cls: type) -> type:
        hints = typing.get_type_hints(cls)
        fields = []
        for f in dataclasses.fields(cls):
            tp = field_type(hints[f.name])
            meta = f.metadata
            if "choices" in meta:
                tp = typing.Literal[tuple(meta["choices"])]
            elif "min" in meta or "max" in meta:
                bounds = msgspec.Meta(ge=meta.get("min"), le=meta.get("max"))
                inner = [a for a in typing.get_args(tp) if a is not type(None)]
                if typing.get_origin(tp) in (Union, types.UnionType) and len(inner) == 1:
                    tp = Annotated[inner[0], bounds] | None
                else:
                    tp = Annotated[tp, bounds]
            fields.append((f.name, tp, None))
        return msgspec.defstruct(f"{cls.__name__}Struct", fields, forbid_unknown_fields=True)

    def field_type(tp: Any) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin in (Union, types.UnionType):
            return Union[tuple(field_type(a) for a in args)]  # noqa: UP007
        if origin in (list, tuple):
            return list[field_type(args[0]) if args else Any]
        if origin is dict:
            return dict[str, field_type(args[1])]
        if dataclasses.is_dataclass(tp):
            return struct(tp)
        if tp is dict:
            return dict[str, Any]
        if tp is Path:
            return Annotated[str, msgspec.Meta(min_length=1)]
        return tp

    def parse(cls: type, data: Any) -> Any:
        return msgspec.convert(data, struct(cls), strict=True)

    return parse, struct.cache_clear, msgspec.ValidationError


def _pydantic_engine() -> Any:
    import pydantic

    from edgeserve.config import schema

    def parse(cls: type, data: Any) -> Any:
        return schema.parse_section(cls, data, "")

    def clear() -> None:
        schema._model.cache_clear()
        schema._hints.cache_clear()

    return parse, clear, (schema.ConfigError, pydantic.ValidationError)


def engines() -> list[tuple[str, Any]]:
    found = [("msgspec", _msgspec_engine())] if HAVE_MSGSPEC else []
    return [*found, ("pydantic", _pydantic_engine())]


def settings_cost(engine: Any, parses: int) -> tuple[float, float]:
    """(ms for the first parse of every shipped file, compile included; ms per parse after)."""
    from edgeserve.config.loader import Settings
    from edgeserve.serving.repository import ModelConfig

    parse, clear, _ = engine
    docs = shipped_toml()

    def all_once() -> None:
        for name, data in docs:
            data = {k: v for k, v in data.items() if k != "source"}
            parse(Settings if name == "edgeserve.toml" else ModelConfig, data)

    clear()
    t0 = time.perf_counter()
    all_once()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(parses):
        all_once()
    return first * 1000, (time.perf_counter() - t0) / parses * 1000


def documents() -> tuple[bytes, bytes]:
    """One experiment document and one bundle manifest as the API and a bundle carry them."""
    experiment = {
        "id": "digits-v3",
        "model": "digits",
        "variants": [
            {"name": "control", "version": 1, "weight": 0.5},
            {"name": "candidate", "version": 2, "weight": 0.5},
        ],
        "unit": "header:x-user",
        "primary_metric": "accuracy",
        "stages": [5.0, 25.0, 50.0, 100.0],
        "auto": True,
    }
    manifest = {
        "format_version": 1,
        "model": "digits",
        "version": 3,
        "backend": "auto",
        "created": "2026-12-07T12:00:00Z",
        "files": [{"name": "model.onnx", "sha256": "ab" * 32, "size": 12345}],
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "label", "datatype": "INT64", "shape": [-1]}],
        "signing_key_id": "k1",
        "data_key": {
            "scheme": "fleet-aes256gcm",
            "key_id": "f1",
            "nonce": "bm9uY2U=",
            "wrapped": "d3Jh",
        },
        "model_config": (ROOT / "models" / "digits" / "model.toml").read_text(),
        "samples": [
            {
                "inputs": {"input": {"datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}},
                "expected": {"label": {"data": [0]}},
                "tolerance": 0.0,
            }
        ],
    }
    return json.dumps(experiment).encode(), json.dumps(manifest).encode()


def _dataclass_shaped(manifest_raw: bytes) -> bytes:
    """The manifest with `expected` as the dataclass holds it (the wire nests it in `data`)."""
    doc = json.loads(manifest_raw)
    for sample in doc["samples"]:
        sample["expected"] = {k: v["data"] for k, v in sample["expected"].items()}
    return json.dumps(doc).encode()


def document_cost(parses: int) -> dict[str, dict[str, float]]:
    """µs per document: edgeserve's parsers, and each library decoding into the dataclass."""
    import pydantic

    from edgeserve.experiments.model import Experiment, parse_definition
    from updater.manifest import Manifest, parse_manifest

    exp_raw, man_raw = documents()
    lib_raw = _dataclass_shaped(man_raw)
    exp_adapter = pydantic.TypeAdapter(Experiment)
    man_adapter = pydantic.TypeAdapter(Manifest)
    jobs = {
        "edgeserve parsers": (
            lambda: parse_definition(json.loads(exp_raw)),
            lambda: parse_manifest(man_raw),
        ),
        "pydantic": (
            lambda: exp_adapter.validate_json(exp_raw, strict=True),
            lambda: man_adapter.validate_json(lib_raw, strict=True),
        ),
    }
    if HAVE_MSGSPEC:
        import msgspec

        jobs["msgspec"] = (
            lambda: msgspec.json.decode(exp_raw, type=Experiment, strict=True),
            lambda: msgspec.json.decode(lib_raw, type=Manifest, strict=True),
        )
    out: dict[str, dict[str, float]] = {}
    for name, (exp, man) in jobs.items():
        out[name] = {}
        for what, fn in (("experiment", exp), ("manifest", man)):
            fn()
            t0 = time.perf_counter()
            for _ in range(parses):
                fn()
            out[name][what] = (time.perf_counter() - t0) / parses * 1e6
    return out


BROKEN = "max_batch_size = 8\n[[inputs]]\nname = 'x'\nshape = [-1, 64]\ndatatype = 'FP32'\n" + (
    "[batching]\nmax_queue_size = 0\n"
)


def messages() -> dict[str, str]:
    from edgeserve.serving.repository import ModelConfig

    data = tomllib.loads(BROKEN)
    out = {}
    for name, engine in engines():
        parse, _, errors = engine
        try:
            parse(ModelConfig, data)
        except errors as exc:
            out[name] = str(exc)
    import pydantic

    from edgeserve.config import schema

    try:  # what pydantic hands over before edgeserve words it: structured, with the value
        schema._model(ModelConfig).model_validate(data)
    except pydantic.ValidationError as exc:
        out["pydantic (raw)"] = repr(exc.errors(include_url=False)[0])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--parses", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M}Z")
    if not HAVE_MSGSPEC:
        print("msgspec is not installed: its rows are left out (pip install msgspec)")
    modules = ("msgspec",) * HAVE_MSGSPEC + ("pydantic", "edgeserve.config.schema")
    for module in modules:
        ms, mib = import_cost(module, args.repeat)
        print(f"import {module:<24} {ms:7.1f} ms  +{mib:5.1f} MiB RSS")
    for name, engine in engines():
        first, warm = settings_cost(engine, args.parses)
        print(f"settings {name:<9} first parse (compile incl.) {first:6.2f} ms, then {warm:.3f} ms")
    for name, row in document_cost(args.parses * 10).items():
        print(
            f"documents {name:<21} experiment {row['experiment']:6.1f} µs"
            f"  manifest {row['manifest']:6.1f} µs"
        )
    for name, text in messages().items():
        print(f"message {name}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
