"""Score one chunk of rows: map columns to tensors, fetch store features, run the model.

Rows that cannot be scored (empty or non-numeric values, a missing entity, a row the
model fails on) are returned as errors with their row number; the others are scored.
The output table holds `row` (the input row number, from 0), any kept columns and one
column per model output (a list column when an output has several values per row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from edgeserve.errors import InferenceFailed, InvalidInput
from edgeserve.offline.mapping import gather, lists_from_text, to_tensor
from edgeserve.offline.plan import CLI_WORDING, InputSource, Wording, plan_inputs
from edgeserve.runtime import Runtime, TensorSpec
from edgeserve.runtime.datatypes import V2_TO_NUMPY
from edgeserve.serving.features import FeatureStore, feature_plan, feature_tensors
from edgeserve.serving.repository import ModelConfig

MAX_ROWS_PER_CALL = 4096


@dataclass
class ScoredChunk:
    table: pa.Table
    errors: list[dict] = field(default_factory=list)


class ChunkScorer:
    """Everything needed to turn input chunks into output chunks for one model."""

    def __init__(
        self,
        runtime: Runtime,
        config: ModelConfig,
        columns: Sequence[str],
        explicit_map: dict[str, str] | None = None,
        keep: Sequence[str] = (),
        outputs: Sequence[str] | None = None,
        feature_store: Path | None = None,
        *,
        output_prefix: str = "",
        added: Sequence[str] = ("row",),
        wording: Wording = CLI_WORDING,
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.features = config.features if config.features.table else None
        skip = list(self.features.inputs) if self.features else []
        if self.features and self.features.entity not in columns:
            raise InvalidInput(
                f"the model reads features by entity id: no column '{self.features.entity}'"
            )
        self.plan: list[InputSource] = plan_inputs(
            runtime.inputs, columns, explicit_map, skip, wording
        )
        self.store = FeatureStore(feature_store) if self.features and feature_store else None
        if self.features and self.store is None:
            raise InvalidInput("the model reads features from the store: pass --features DB")
        for name in keep:
            if name not in columns:
                raise InvalidInput(f"{wording.keep_option}: no column '{name}' in {wording.table}")
        self.keep = list(keep)
        known = {s.name for s in runtime.outputs}
        for name in outputs or ():
            if name not in known:
                raise InvalidInput(f"--outputs: the model has no output '{name}'")
        self.outputs = list(outputs) if outputs else [s.name for s in runtime.outputs]
        self.prefix = output_prefix
        refuse_collisions(self.keep, [*added, *(output_prefix + n for n in self.outputs)], wording)
        # max_batch_size bounds one request on the server (latency, fairness); offline
        # there is no one to be fair to, so calls are as large as the model allows.
        fixed = {s.shape[0] for s in runtime.inputs if s.shape and s.shape[0] > 0}
        self.rows_per_call = min(fixed) if fixed else MAX_ROWS_PER_CALL

    def score(self, table: pa.Table, first_row: int) -> ScoredChunk:
        n = table.num_rows
        ok = np.ones(n, dtype=bool)
        errors: dict[int, str] = {}
        if "__invalid__" in table.column_names:
            flags = table.column("__invalid__").to_numpy(zero_copy_only=False)
            for pos in np.nonzero(flags == True)[0]:  # noqa: E712 - nulls are False
                ok[pos] = False
                errors[int(pos)] = "line is not a JSON object"
        for source in self.plan:
            table = lists_from_text(table, source)
            to_tensor(table, source, ok, errors)
        feeds = self._gather(table, ok, errors)
        if self.features:
            feeds = self._add_features(table, ok, errors, feeds)
        outputs, ok = self._run(feeds, ok, errors)
        return ScoredChunk(
            self._output_table(table, ok, first_row, outputs), _errors(errors, first_row)
        )

    def _gather(self, table: pa.Table, ok: np.ndarray, errors: dict[int, str]) -> dict:
        while True:
            before = int(ok.sum())
            feeds = {}
            for source in self.plan:
                array = gather(table, source, ok, errors)
                if array is None:
                    break
                feeds[source.input] = array
            else:
                return feeds
            if int(ok.sum()) == before:
                raise InvalidInput("a column could not be converted to the input's type")

    def _add_features(
        self, table: pa.Table, ok: np.ndarray, errors: dict[int, str], feeds: dict
    ) -> dict:
        assert self.features is not None and self.store is not None
        ids = [
            None if v is None else str(v) for v in table.column(self.features.entity).to_pylist()
        ]
        for pos, entity in enumerate(ids):
            if entity is None and ok[pos]:
                ok[pos] = False
                errors[pos] = f"column '{self.features.entity}' is empty"
        rows = self.store.fetch(self.features.table, [i or "" for i in ids])
        before = ok.copy()
        for pos in np.nonzero(ok)[0]:
            if rows.rows[pos] is None:
                ok[pos] = False
                errors[int(pos)] = f"no features for entity '{ids[pos]}'"
        plan = feature_plan(self.features, self.runtime.inputs, rows)
        tensors, bad = feature_tensors(plan, rows, np.nonzero(ok)[0])
        for pos, reason in bad.items():
            ok[pos] = False
            errors[pos] = reason
        # request-fed tensors were gathered for `before`; keep the rows still ok
        keep = ok[before]
        feeds = {k: v[keep] for k, v in feeds.items()}
        feeds.update(tensors)
        return feeds

    def _run(
        self, feeds: dict[str, np.ndarray], ok: np.ndarray, errors: dict[int, str]
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        count = int(ok.sum())
        parts: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        positions = np.nonzero(ok)[0]
        failed: list[int] = []
        for start in range(0, count, self.rows_per_call):
            piece = {k: v[start : start + self.rows_per_call] for k, v in feeds.items()}
            try:
                result = self.runtime.run(piece, self.outputs)
            except InferenceFailed:
                result, bad = self._row_by_row(piece)
                failed.extend(int(positions[start + i]) for i in bad)
            if result is not None:
                for name in self.outputs:
                    parts[name].append(result[name])
        for pos in failed:
            ok[pos] = False
            errors[pos] = "the model failed to compute this row"
        if not int(ok.sum()):
            return {}, ok
        return {k: np.concatenate(v) for k, v in parts.items()}, ok

    def _row_by_row(
        self, piece: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray] | None, list[int]]:
        """A failed call is retried one row at a time to find the rows at fault."""
        rows = len(next(iter(piece.values())))
        good: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        bad = []
        for i in range(rows):
            try:
                one = self.runtime.run({k: v[i : i + 1] for k, v in piece.items()}, self.outputs)
            except InferenceFailed:
                bad.append(i)
                continue
            for name in self.outputs:
                good[name].append(one[name])
        if len(bad) == rows:
            return None, bad
        return {k: np.concatenate(v) for k, v in good.items()}, bad

    def _output_table(
        self, table: pa.Table, ok: np.ndarray, first_row: int, outputs: dict[str, np.ndarray]
    ) -> pa.Table:
        rows = np.nonzero(ok)[0]
        columns: dict[str, pa.Array] = {"row": pa.array(rows + first_row, pa.int64())}
        mask = pa.array(ok)
        for name in self.keep:
            columns[name] = table.column(name).filter(mask)
        specs = {s.name: s for s in self.runtime.outputs}
        for name in self.outputs:
            columns[self.prefix + name] = _column(outputs.get(name), specs[name])
        return pa.table(columns)


def refuse_collisions(kept: Sequence[str], added: Sequence[str], wording: Wording) -> None:
    """A kept column named like a column scoring adds would be overwritten (or break the
    output schema): refuse before the first row, naming it."""
    for name in kept:
        if name in added:
            raise InvalidInput(
                f"column '{name}' in {wording.table} has the name of a column scoring adds "
                f"({', '.join(added)}); rename or drop it, leave it out of "
                f"{wording.keep_option}, or prefix the outputs with "
                f"{wording.prefix_option}'pred_'"
            )


def _column(array: np.ndarray | None, spec: TensorSpec) -> pa.Array:
    """One output as a column: scalar per row, or a fixed-size list of its values."""
    dtype = V2_TO_NUMPY[spec.datatype]
    value_type = pa.string() if spec.datatype == "BYTES" else pa.from_numpy_dtype(dtype)
    per_row = spec.shape[1:]
    if array is None:
        width = int(np.prod(per_row)) if per_row and all(d > 0 for d in per_row) else 0
        if width:
            return pa.FixedSizeListArray.from_arrays(pa.array([], value_type), width)
        return pa.array([], value_type)
    if array.dtype == np.object_:
        array = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else str(v))(array)
    if array.ndim == 1:
        return pa.array(array)
    width = int(np.prod(array.shape[1:]))
    flat = np.ascontiguousarray(array).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), width)


def _errors(errors: dict[int, str], first_row: int) -> list[dict]:
    return [{"row": first_row + pos, "error": msg} for pos, msg in sorted(errors.items())]
