"""Turn a chunk (a pyarrow table) into model tensors along an input plan (see `plan`).

A row with a missing (null), non-numeric, NaN or wrongly sized value is marked failed
with a reason, so the caller reports it as a row error and scores the rest.
"""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from edgeserve.errors import InvalidInput
from edgeserve.offline.plan import InputSource
from edgeserve.runtime.datatypes import V2_TO_NUMPY


def to_tensor(table: pa.Table, source: InputSource, ok: np.ndarray, errors: dict[int, str]) -> None:
    """Check one input's columns for every row: rows that cannot be converted are marked
    in `ok` (False) with a reason in `errors` (row position -> message)."""
    if source.list_column:
        col = table.column(source.columns[0])
        if not _is_list(col.type):
            raise InvalidInput(
                f"column '{source.columns[0]}' for input '{source.input}' must hold "
                f"lists of {source.size} values"
            )
        lengths = pc.fill_null(pc.list_value_length(col), -1).to_numpy(zero_copy_only=False)
        for pos in np.nonzero(lengths != source.size)[0]:
            _fail(ok, errors, int(pos), f"'{source.columns[0]}' must hold {source.size} values")
        return
    for name in source.columns:
        nulls = table.column(name).is_null().to_numpy(zero_copy_only=False)
        for pos in np.nonzero(nulls)[0]:
            _fail(ok, errors, int(pos), f"column '{name}' is empty")


def lists_from_text(table: pa.Table, source: InputSource) -> pa.Table:
    """A list column that arrived as JSON text (mixed types in a JSON Lines chunk) is
    parsed row by row; a row that is not a list of numbers becomes null (a row error)."""
    name = source.columns[0]
    col = table.column(name)
    if not source.list_column or _is_list(col.type) or not pa.types.is_string(col.type):
        return table
    rows = []
    for text in col.to_pylist():
        try:
            value = orjson.loads(text) if text is not None else None
            rows.append([float(v) for v in value] if isinstance(value, list) else None)
        except (orjson.JSONDecodeError, TypeError, ValueError):
            rows.append(None)
    index = table.column_names.index(name)
    return table.set_column(index, name, pa.array(rows, pa.list_(pa.float64())))


def _is_list(tp: pa.DataType) -> bool:
    return pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp)


def gather(
    table: pa.Table, source: InputSource, ok: np.ndarray, errors: dict[int, str]
) -> np.ndarray | None:
    """The input's tensor for the rows still `ok` (others dropped); rows whose values do
    not convert are marked failed and the caller must gather again (None is returned)."""
    dtype = V2_TO_NUMPY[source.datatype]
    keep = pa.array(ok)
    if source.list_column:
        col = pc.filter(table.column(source.columns[0]), keep).combine_chunks()
        values = col.flatten() if not pa.types.is_fixed_size_list(col.type) else col.values
        try:
            flat = _cast(values, dtype)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for pos, row in zip(np.nonzero(ok)[0], col.to_pylist(), strict=True):
                try:
                    np.asarray(row, dtype=np.float64)
                except (TypeError, ValueError):
                    _fail(ok, errors, int(pos), f"'{source.columns[0]}' holds a non-number")
            return None
        if _mark_nan(flat.reshape(len(col), -1), ok, errors, f"'{source.columns[0]}' holds NaN"):
            return None
        return flat.reshape((len(col), *source.row_shape))
    parts = []
    positions = np.nonzero(ok)[0]
    for name in source.columns:
        col = pc.filter(table.column(name), keep).combine_chunks()
        try:
            parts.append(_cast(col, dtype))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            for pos, value in zip(positions, col.to_pylist(), strict=True):
                try:
                    float(value)
                except (TypeError, ValueError):
                    _fail(ok, errors, int(pos), f"column '{name}' is not a number: {value!r:.40}")
            return None
    for name, part in zip(source.columns, parts, strict=True):
        if _mark_nan(part.reshape(len(part), -1), ok, errors, f"column '{name}' is NaN"):
            return None
    stacked = parts[0].reshape(-1, 1) if len(parts) == 1 else np.column_stack(parts)
    return stacked.reshape((len(stacked), *source.row_shape))


def _mark_nan(rows: np.ndarray, ok: np.ndarray, errors: dict[int, str], message: str) -> bool:
    """Rows holding NaN (not a number: a missing float in Spark and pandas) are failed
    with `message` rather than scored into garbage; True when any was found."""
    if rows.dtype.kind != "f" or not len(rows):
        return False
    bad = np.isnan(rows).any(axis=1)
    if not bad.any():
        return False
    for pos in np.nonzero(ok)[0][bad]:
        _fail(ok, errors, int(pos), f"{message} (not a number)")
    return True


def _cast(values: pa.Array, dtype: np.dtype) -> np.ndarray:
    if dtype == np.object_:
        return np.array(
            [v if isinstance(v, bytes) else str(v).encode() for v in values.to_pylist()],
            dtype=object,
        )
    return pc.cast(values, pa.from_numpy_dtype(dtype)).to_numpy(zero_copy_only=False)


def _fail(ok: np.ndarray, errors: dict[int, str], pos: int, message: str) -> None:
    if ok[pos]:
        ok[pos] = False
        errors[pos] = message
