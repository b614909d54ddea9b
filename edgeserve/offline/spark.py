"""Score a Spark DataFrame with an edgeserve model, for when one box is not enough.

    from edgeserve.offline.spark import score_dataframe
    scored = score_dataframe(df, "/models/digits", input_map={"input": "pixel_*"})

Each executor's Python worker loads the model once (a module-level cache keyed by the
model source) and scores its partitions through `mapInPandas`, with the same column
mapping and chunk scoring as `edgeserve batch score`, so answers match the server's.
A row that cannot be scored gets null outputs and a reason in the `error` column.

Sources: a model folder (`model.toml` + version folders), or an encrypted bundle file
opened by `bundle_opener(path, key) -> (model.toml text, {file: bytes})`, normally
`SignedBundleOpener(trusted_keys)`: the signature is checked and the payload decrypted
in the executor's memory only, with the key the job passes (e.g. from the cluster's
secret store). Needs `pip install 'edgeserve[spark]'`.

    opener = SignedBundleOpener(["<ed25519 public key>"])
    scored = score_dataframe(df, "/shared/digits-7.bundle", key=fleet_key_text,
                             bundle_opener=opener)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.runtime import Runtime, TensorSpec, ThreadPlan, create_runtime
from edgeserve.serving.repository import ModelConfig, parse_model_config, read_model

BundleOpener = Callable[[str, bytes | None], tuple[str, dict[str, bytes]]]
ERROR_COLUMN = "error"

_MODELS: dict[tuple, tuple[Runtime, ModelConfig]] = {}
_LOCK = threading.Lock()


def cached_model(
    source: str,
    version: int | None = None,
    backend: str = "onnxruntime",
    key: bytes | None = None,
    bundle_opener: BundleOpener | None = None,
) -> tuple[Runtime, ModelConfig]:
    """The model from `source`, loaded at most once per process (executor worker)."""
    cache_key = (source, version, backend)
    with _LOCK:
        if cache_key not in _MODELS:
            _MODELS[cache_key] = _load(source, version, backend, key, bundle_opener)
        return _MODELS[cache_key]


def _load(
    source: str,
    version: int | None,
    backend: str,
    key: bytes | None,
    bundle_opener: BundleOpener | None,
) -> tuple[Runtime, ModelConfig]:
    path = Path(source)
    if path.is_dir():
        model = read_model(path)
        chosen = version or model.config.default_version or max(model.versions)
        files = model.read_files(chosen)
        config = model.config
    else:
        if bundle_opener is None:
            raise ValueError(f"{source} is not a model folder; a bundle needs bundle_opener")
        toml_text, files = bundle_opener(source, key)
        config = parse_model_config(toml_text, f"{path.name}/model.toml")
    if config.backend != "auto":
        backend = config.backend
    # one thread per call: Spark already runs one task per executor core
    return create_runtime(backend, files, ThreadPlan(intra_op=1, inter_op=1)), config


class SignedBundleOpener:
    """Opens an edgeserve bundle on an executor: the signature must verify against one
    of `trusted_keys` (as in [updater] trusted_keys), and the payload is decrypted in
    memory with the job's key, the text of a fleet or device key file
    (`fleet:<base64>` / `x25519:<base64>`). Picklable, so Spark ships it to executors.
    """

    def __init__(self, trusted_keys: Sequence[str]) -> None:
        self.trusted_keys = list(trusted_keys)

    def __call__(self, path: str, key: bytes | None) -> tuple[str, dict[str, bytes]]:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from updater.bundle import BundlePolicy, verify_bundle
        from updater.masterkey import parse_key_material
        from updater.signing import TrustedKeys
        from updater.wrapping import DeviceKey, FleetKey

        if key is None:
            raise ValueError("a bundle needs the job's key (fleet:... or x25519:...)")
        kind, _, body = key.decode("ascii").strip().partition(":")
        material = parse_key_material(body.encode(), "the job's key")
        unwrap = (
            FleetKey(material)
            if kind == "fleet"
            else DeviceKey(X25519PrivateKey.from_private_bytes(material))
        )
        policy = BundlePolicy(TrustedKeys.from_texts(self.trusted_keys), [unwrap])
        verified = verify_bundle(Path(path), policy, allow_downgrade=True)
        manifest = verified.manifest
        toml_text = manifest.model_config or f'backend = "{manifest.backend}"\n'
        return toml_text, dict(verified.files)


def score_dataframe(
    df: Any,
    model: str,
    *,
    version: int | None = None,
    input_map: Mapping[str, str] | None = None,
    outputs: Sequence[str] | None = None,
    keep: Sequence[str] | None = None,
    backend: str = "onnxruntime",
    key: bytes | None = None,
    bundle_opener: BundleOpener | None = None,
) -> Any:
    """`df` scored by `model` (a model folder or bundle path readable by every executor).

    Returns the `keep` columns (default: every column the model does not read), one
    column per model output (arrays for outputs with several values per row), and
    `error`. Column mapping follows `edgeserve.offline.plan`.
    """
    from edgeserve.offline.plan import plan_inputs

    runtime, _ = cached_model(model, version, backend, key, bundle_opener)
    plan = plan_inputs(runtime.inputs, df.columns, input_map)
    used = {c for source in plan for c in source.columns}
    kept = list(keep) if keep is not None else [c for c in df.columns if c not in used]
    wanted = list(outputs) if outputs else [s.name for s in runtime.outputs]
    schema = _output_schema(df.schema, kept, [s for s in runtime.outputs if s.name in wanted])
    args = (model, version, backend, key, bundle_opener, dict(input_map or {}), kept, wanted)

    def score_partition(frames: Iterator[Any]) -> Iterator[Any]:
        for frame in frames:
            yield score_pandas(frame, *args)

    return df.mapInPandas(score_partition, schema)


def score_pandas(
    frame: Any,
    model: str,
    version: int | None,
    backend: str,
    key: bytes | None,
    bundle_opener: BundleOpener | None,
    input_map: dict[str, str],
    kept: list[str],
    wanted: list[str],
) -> Any:
    """Score one pandas batch (runs in the executor's Python worker)."""
    import pandas as pd
    import pyarrow as pa

    from edgeserve.offline.scoring import ChunkScorer

    runtime, config = cached_model(model, version, backend, key, bundle_opener)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    scorer = ChunkScorer(runtime, config, table.column_names, input_map, (), wanted)
    scored = scorer.score(table, 0)
    n = len(frame)
    result = {name: frame[name].reset_index(drop=True) for name in kept}
    rows = scored.table.column("row").to_numpy()
    for name in wanted:
        column: list[Any] = [None] * n
        values = scored.table.column(name).to_pylist()
        for pos, value in zip(rows, values, strict=True):
            column[int(pos)] = value
        result[name] = pd.Series(column, dtype=object)
    errors: list[str | None] = [None] * n
    for entry in scored.errors:
        errors[entry["row"]] = entry["error"]
    result[ERROR_COLUMN] = pd.Series(errors, dtype=object)
    return pd.DataFrame(result)


def _output_schema(source: Any, kept: list[str], specs: list[TensorSpec]) -> Any:
    from pyspark.sql import types as T

    scalar = {
        "BOOL": T.BooleanType(),
        "INT8": T.ByteType(),
        "INT16": T.ShortType(),
        "INT32": T.IntegerType(),
        "INT64": T.LongType(),
        "UINT8": T.ShortType(),
        "UINT16": T.IntegerType(),
        "UINT32": T.LongType(),
        "UINT64": T.LongType(),
        "FP16": T.FloatType(),
        "FP32": T.FloatType(),
        "FP64": T.DoubleType(),
        "BYTES": T.StringType(),
    }
    fields = [source[name] for name in kept]
    for spec in specs:
        per_row = spec.shape[1:]
        element = scalar[spec.datatype]
        many = bool(per_row) and int(np.prod([abs(d) for d in per_row])) != 1
        fields.append(T.StructField(spec.name, T.ArrayType(element) if many else element))
    fields.append(T.StructField(ERROR_COLUMN, T.StringType()))
    return T.StructType(fields)
