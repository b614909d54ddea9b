"""Score a Spark DataFrame with an edgeserve model, for when one box is not enough.

    from edgeserve.offline.spark import score_dataframe
    scored = score_dataframe(df, "/models/digits", input_map={"input": "pixel_*"})

The driver opens the model once to check the columns and to settle the backend and
version; each executor's Python worker then opens the same model (cached per process,
see `spark_model`), refuses one that differs from the driver's, and scores its
partitions as Arrow batches (`mapInArrow`) with the same column mapping and chunk
scoring as `edgeserve batch score`. A row that cannot be scored gets null outputs and
a reason in the `error` column. Every output field's metadata says which model,
version and backend scored it (`scored.schema["label"].metadata["edgeserve"]`).

Sources: a model folder (`model.toml` + version folders), or an encrypted bundle file
opened by `bundle_opener(path, key) -> (model.toml text, {file: bytes})`, normally
`SignedBundleOpener(trusted_keys)`: the signature is checked and the payload decrypted
in the executor's memory only, with the key the job passes (e.g. from the cluster's
secret store). Needs `pip install 'edgeserve[spark]'` on the driver and every executor.

    opener = SignedBundleOpener(["<ed25519 public key>"])
    scored = score_dataframe(df, "/shared/digits-7.bundle", key=fleet_key_text,
                             bundle_opener=opener)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeserve.errors import InvalidInput
from edgeserve.offline.plan import SPARK_WORDING, plan_inputs
from edgeserve.offline.spark_model import (
    BundleFingerprint,
    BundleOpener,
    SignedBundleOpener,
    SparkModel,
    cached_model,
)
from edgeserve.runtime import TensorSpec

__all__ = [
    "ERROR_COLUMN",
    "BundleFingerprint",
    "BundleOpener",
    "ScoringJob",
    "SignedBundleOpener",
    "SparkModel",
    "cached_model",
    "score_dataframe",
]

ERROR_COLUMN = "error"

# V2 datatype -> (Spark SQL type name, Arrow type name) of one output value.
_TYPES = {
    "BOOL": ("BooleanType", "bool_"),
    "INT8": ("ByteType", "int8"),
    "INT16": ("ShortType", "int16"),
    "INT32": ("IntegerType", "int32"),
    "INT64": ("LongType", "int64"),
    "UINT8": ("ShortType", "int16"),
    "UINT16": ("IntegerType", "int32"),
    "UINT32": ("LongType", "int64"),
    "UINT64": ("LongType", "int64"),
    "FP16": ("FloatType", "float32"),
    "FP32": ("FloatType", "float32"),
    "FP64": ("DoubleType", "float64"),
    "BYTES": ("StringType", "string"),
}


@dataclass(frozen=True)
class ScoringJob:
    """What every executor needs to score a batch exactly as the driver planned it.
    Picklable; `key` is never shown in its repr."""

    source: str
    version: int | None
    backend: str  # the backend the driver's open settled on, never `auto`
    digest: str  # the model the driver opened: executors refuse another
    key: bytes | None = field(default=None, repr=False)
    bundle_opener: BundleOpener | None = None
    input_map: dict[str, str] = field(default_factory=dict)
    kept: tuple[str, ...] = ()
    wanted: tuple[str, ...] = ()
    output_prefix: str = ""
    many: tuple[bool, ...] = ()  # per wanted output: several values per row

    @classmethod
    def for_source(cls, source: str, backend: str = "auto", **options: Any) -> ScoringJob:
        """A job on every output of `source`, keeping no column (benchmarks, tests)."""
        model = cached_model(source, options.get("version"), backend)
        wanted = tuple(s.name for s in model.runtime.outputs)
        return cls(
            source,
            model.version,
            model.runtime.backend,
            model.digest,
            wanted=wanted,
            many=tuple(_many(s) for s in model.runtime.outputs),
            **options,
        )

    def model(self) -> SparkModel:
        opened = cached_model(self.source, self.version, self.backend, self.key, self.bundle_opener)
        if opened.digest != self.digest:
            raise InvalidInput(
                f"the model at {self.source} changed after the job started (the driver "
                "opened another one); run the job again"
            )
        return opened

    def score_batch(self, batch: Any) -> Any:
        """Score one Arrow record batch (runs in the executor's Python worker): kept
        columns as they came, outputs built from the scored arrays, no row loop."""
        import pyarrow as pa

        from edgeserve.offline.scoring import ChunkScorer

        model = self.model()
        table = pa.Table.from_batches([batch])
        scorer = ChunkScorer(
            model.runtime,
            model.config,
            table.column_names,
            self.input_map,
            (),
            list(self.wanted),
            wording=SPARK_WORDING,
        )
        scored = scorer.score(table, 0)
        n = batch.num_rows
        rows = scored.table.column("row").to_numpy()
        take = None
        if len(rows) != n:  # failed rows get nulls: gather with null indices
            index = np.full(n, -1, dtype=np.int64)
            index[rows] = np.arange(len(rows))
            take = pa.array(index, mask=index < 0)
        arrays = [batch.column(name) for name in self.kept]
        specs = {s.name: s for s in model.runtime.outputs}
        for name, many in zip(self.wanted, self.many, strict=True):
            value = getattr(pa, _TYPES[specs[name].datatype][1])()
            column = scored.table.column(name).combine_chunks()
            column = column.cast(pa.list_(value) if many else value)
            arrays.append(column if take is None else column.take(take))
        errors: list[str | None] = [None] * n
        for entry in scored.errors:
            errors[entry["row"]] = entry["error"]
        arrays.append(pa.array(errors, pa.string()))
        names = [*self.kept, *(self.output_prefix + w for w in self.wanted)]
        return pa.RecordBatch.from_arrays(arrays, names=[*names, self.output_prefix + ERROR_COLUMN])


def score_dataframe(
    df: Any,
    model: str,
    *,
    version: int | None = None,
    input_map: Mapping[str, str] | None = None,
    outputs: Sequence[str] | None = None,
    keep: Sequence[str] | None = None,
    backend: str = "auto",
    key: bytes | None = None,
    bundle_opener: BundleOpener | None = None,
    output_prefix: str = "",
) -> Any:
    """`df` scored by `model` (a model folder or bundle path readable by every executor).

    Returns the `keep` columns (default: every column the model does not read), one
    column per model output (arrays for outputs with several values per row), and
    `error`, each named with `output_prefix` in front. A kept column named like one of
    those is refused here, before any task runs. `backend="auto"` chooses as the
    server does without samples (OpenVINO, else ONNX Runtime), once, on the driver;
    pin it (here or in model.toml) to match a server that chose otherwise.
    """
    from edgeserve.offline.scoring import refuse_collisions

    opened = cached_model(model, version, backend, key, bundle_opener)
    runtime = opened.runtime
    plan = plan_inputs(runtime.inputs, df.columns, input_map, wording=SPARK_WORDING)
    used = {c for source in plan for c in source.columns}
    kept = list(keep) if keep is not None else [c for c in df.columns if c not in used]
    for name in kept:
        if name not in df.columns:
            raise InvalidInput(f"keep: no column '{name}' in the DataFrame")
    known = [s.name for s in runtime.outputs]
    for name in outputs or ():
        if name not in known:
            raise InvalidInput(f"outputs: the model has no output '{name}'")
    specs = [s for s in runtime.outputs if s.name in (outputs or known)]
    added = [output_prefix + s.name for s in specs] + [output_prefix + ERROR_COLUMN]
    refuse_collisions(kept, added, SPARK_WORDING)
    job = ScoringJob(
        model,
        opened.version,
        runtime.backend,
        opened.digest,
        key,
        bundle_opener,
        dict(input_map or {}),
        tuple(kept),
        tuple(s.name for s in specs),
        output_prefix,
        tuple(_many(s) for s in specs),
    )
    scored_by = {
        "model": opened.name,
        "version": opened.version,
        "backend": runtime.backend,
        "digest": opened.digest[:16],
    }
    schema = _output_schema(df.schema, kept, specs, output_prefix, scored_by)

    def score_partition(batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            yield job.score_batch(batch)

    return df.mapInArrow(score_partition, schema)


def _many(spec: TensorSpec) -> bool:
    per_row = spec.shape[1:]
    return bool(per_row) and int(np.prod([abs(d) for d in per_row])) != 1


def _output_schema(
    source: Any, kept: list[str], specs: list[TensorSpec], prefix: str, scored_by: dict
) -> Any:
    from pyspark.sql import types as T

    fields = [source[name] for name in kept]
    for spec in specs:
        element = getattr(T, _TYPES[spec.datatype][0])()
        kind = T.ArrayType(element) if _many(spec) else element
        fields.append(T.StructField(prefix + spec.name, kind, metadata={"edgeserve": scored_by}))
    fields.append(T.StructField(prefix + ERROR_COLUMN, T.StringType()))
    return T.StructType(fields)
