"""Online feature store: SQLite tables keyed by an entity id, read before inference.

A model's `model.toml` may declare (`[features]`) that some inputs come from a table
here instead of the request, as Feast's SQLite online store does: the request (or a
batch row) carries only the entity id. The server, the batch CLI, jobs and Spark all
arrange the fetched columns into tensors with the same plan (`edgeserve.offline.plan`),
so training-time and serving-time features cannot drift apart.

`load_features` fills a table from a CSV / JSON Lines / Parquet file in one
transaction: readers see the old table until the new one is complete.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from edgeserve.errors import InvalidInput, NotFound
from edgeserve.offline.plan import InputSource, plan_inputs
from edgeserve.runtime import TensorSpec
from edgeserve.runtime.datatypes import V2_TO_NUMPY
from edgeserve.serving.repository import FeatureConfig

META_TABLE = "_edgeserve_feature_tables"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_LOOKUP_BATCH = 500


class MissingEntity(NotFound):
    """No row for the entity id: 404, naming the id (ids are not secrets)."""


@dataclass(frozen=True)
class FeatureRows:
    """Rows fetched for a list of ids, aligned with them (None where missing)."""

    columns: tuple[str, ...]
    list_columns: frozenset[str]
    rows: list[tuple | None]


class FeatureStore:
    """Read side of the store: one read-only connection per thread (SQLite objects
    cannot cross threads, and lookups run on executor threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if not self.path.exists():
                raise NotFound("the feature store is empty: load a table with `features load`")
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            self._local.conn = conn
        return conn

    def fetch(self, table: str, ids: Sequence[str]) -> FeatureRows:
        conn = self._conn()
        meta = conn.execute(
            f"SELECT key, columns FROM {META_TABLE} WHERE name = ?", (table,)
        ).fetchone()
        if meta is None:
            raise NotFound(f"feature table '{table}' does not exist")
        key, columns_json = meta
        kinds = dict(orjson.loads(columns_json))
        columns = tuple(kinds)
        found: dict[str, tuple] = {}
        select = ", ".join(_quote(c) for c in (key, *columns))
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), _LOOKUP_BATCH):
            part = unique[start : start + _LOOKUP_BATCH]
            marks = ",".join("?" * len(part))
            for row in conn.execute(
                f"SELECT {select} FROM {_quote(table)} WHERE {_quote(key)} IN ({marks})", part
            ):
                found[row[0]] = row[1:]
        lists = frozenset(c for c, kind in kinds.items() if kind == "list")
        return FeatureRows(columns, lists, [found.get(i) for i in ids])

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def feature_plan(config: FeatureConfig, specs: Sequence[TensorSpec], rows: FeatureRows) -> list:
    """The input plan for the store-fed inputs, over the table's columns."""
    wanted = [s for s in specs if s.name in config.inputs]
    return plan_inputs(wanted, rows.columns, config.map)


def feature_tensors(
    plan: Sequence[InputSource], rows: FeatureRows, present: Sequence[int]
) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Tensors for the rows at positions `present`, and the positions whose stored values
    are empty or malformed (with the reason), which are left out of the tensors."""
    index = {c: i for i, c in enumerate(rows.columns)}
    bad: dict[int, str] = {}
    values: dict[str, list] = {s.input: [] for s in plan}
    good = []
    for pos in present:
        row = rows.rows[pos]
        assert row is not None
        try:
            per_input = {s.input: _row_values(s, row, index, rows.list_columns) for s in plan}
        except ValueError as exc:
            bad[pos] = str(exc)
            continue
        good.append(pos)
        for name, v in per_input.items():
            values[name].append(v)
    tensors = {}
    for s in plan:
        dtype = V2_TO_NUMPY[s.datatype]
        array = np.asarray(values[s.input], dtype=np.float64 if dtype.kind == "f" else None)
        tensors[s.input] = array.astype(dtype, copy=False).reshape((len(good), *s.row_shape))
    return tensors, bad


def _row_values(
    source: InputSource, row: tuple, index: Mapping[str, int], lists: frozenset[str]
) -> list:
    if source.list_column:
        raw = row[index[source.columns[0]]]
        value = orjson.loads(raw) if raw is not None and source.columns[0] in lists else None
        if not isinstance(value, list) or len(value) != source.size:
            raise ValueError(f"feature '{source.columns[0]}' must hold {source.size} values")
        return value
    out = []
    for c in source.columns:
        v = row[index[c]]
        if v is None:
            raise ValueError(f"feature '{c}' is empty")
        out.append(v)
    return out


def request_entities(
    config: FeatureConfig, named: Mapping[str, Any], parameters: Mapping[str, Any]
) -> list[str]:
    """Entity ids from a request: an input named after `config.entity`, else a request
    parameter of that name (one id or a list)."""
    for name in config.inputs:
        if name in named:
            raise InvalidInput(
                f"input '{name}' comes from the feature store; send '{config.entity}' instead"
            )
    if config.entity in named:
        _, array = named[config.entity]
        return [_entity_text(v) for v in np.asarray(array).reshape(-1)]
    value = parameters.get(config.entity)
    if value is None:
        raise InvalidInput(
            f"this model reads features by entity id: send parameter or input '{config.entity}'"
        )
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
        raise InvalidInput(f"parameter '{config.entity}' must be an id or a list of ids")
    return [str(v) for v in values]


def lookup_request(
    store: FeatureStore,
    config: FeatureConfig,
    specs: Sequence[TensorSpec],
    named: Mapping[str, tuple[str, np.ndarray]],
    parameters: Mapping[str, Any],
) -> dict[str, tuple[str, np.ndarray]]:
    """The request's tensors with the store-fed inputs filled in (blocking: run it off
    the event loop). A missing entity is a 404 naming it; empty features a 400."""
    ids = request_entities(config, named, parameters)
    rows = store.fetch(config.table, ids)
    for entity, row in zip(ids, rows.rows, strict=True):
        if row is None:
            raise MissingEntity(f"no features for entity '{entity[:64]}' in '{config.table}'")
    plan = feature_plan(config, specs, rows)
    tensors, bad = feature_tensors(plan, rows, range(len(ids)))
    if bad:
        pos, reason = next(iter(bad.items()))
        raise InvalidInput(f"features of entity '{ids[pos][:64]}' are unusable: {reason}")
    out = {k: v for k, v in named.items() if k != config.entity or k in {s.name for s in specs}}
    for s in specs:
        if s.name in tensors:
            out[s.name] = (s.datatype, tensors[s.name])
    return out


def _entity_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (np.integer, int)):
        return str(int(value))
    return str(value)


def _quote(name: str) -> str:
    if '"' in name:
        raise InvalidInput(f"bad column or table name {name[:64]!r}")
    return '"' + name + '"'


# -- loading ----------------------------------------------------------------------


def load_features(
    database: Path,
    source: Path,
    table: str,
    key: str,
    fmt: str | None = None,
    upsert: bool = False,
    chunk_rows: int = 50_000,
) -> int:
    """Fill `table` from a file in one transaction; returns the rows written.

    Replace (default) swaps in a new table; `upsert` inserts or replaces rows by key in
    the existing one. Either way a reader sees all of the load or none of it.
    """
    import pyarrow as pa

    from edgeserve.offline.tables import format_of, read_chunks

    if not _NAME.match(table) or table.startswith("_"):
        raise InvalidInput("--table: use letters, digits and '_' (not starting with '_')")
    fmt = format_of(source, fmt)
    database.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {META_TABLE} "
            "(name TEXT PRIMARY KEY, key TEXT NOT NULL, columns TEXT NOT NULL)"
        )
        conn.execute("BEGIN IMMEDIATE")
        kinds: dict[str, str] | None = None
        target = table if upsert else f"{table}__loading"
        total = 0
        for chunk in read_chunks(source, fmt, chunk_rows):
            if key not in chunk.column_names:
                raise InvalidInput(f"--key: no column '{key}' in {source.name}")
            if kinds is None:
                kinds = {c: _kind(chunk.column(c)) for c in chunk.column_names if c != key}
                for c in (key, *kinds):
                    if not _NAME.match(c):
                        raise InvalidInput(f"column name {c[:64]!r} is not a plain identifier")
                kinds = _create(conn, table, target, key, kinds, upsert)
            rows = _rows(chunk, key, kinds, pa)
            marks = ",".join("?" * (len(kinds) + 1))
            names = ", ".join(_quote(c) for c in (key, *kinds))
            conn.executemany(
                f"INSERT OR REPLACE INTO {_quote(target)} ({names}) VALUES ({marks})", rows
            )
            total += len(rows)
        if kinds is None:
            raise InvalidInput(f"{source.name} has no rows")
        if not upsert:
            conn.execute(f"DROP TABLE IF EXISTS {_quote(table)}")
            conn.execute(f"ALTER TABLE {_quote(target)} RENAME TO {_quote(table)}")
        conn.execute(
            f"INSERT OR REPLACE INTO {META_TABLE} VALUES (?, ?, ?)",
            (table, key, orjson.dumps(list(kinds.items())).decode()),
        )
        conn.execute("COMMIT")
        return total
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


def _create(
    conn: sqlite3.Connection, table: str, target: str, key: str, kinds: dict[str, str], upsert: bool
) -> dict[str, str]:
    if upsert:
        meta = conn.execute(f"SELECT key, columns FROM {META_TABLE} WHERE name = ?", (table,))
        found = meta.fetchone()
        if found is not None:
            if found[0] != key or set(dict(orjson.loads(found[1]))) != set(kinds):
                raise InvalidInput(
                    f"--upsert: {table} has key '{found[0]}' and other columns; load without it"
                )
            return dict(orjson.loads(found[1]))
    sql_types = {"int": "INTEGER", "real": "REAL", "list": "TEXT", "text": "TEXT"}
    cols = ", ".join(f"{_quote(c)} {sql_types[k]}" for c, k in kinds.items())
    conn.execute(f"DROP TABLE IF EXISTS {_quote(target)}")
    conn.execute(f"CREATE TABLE {_quote(target)} ({_quote(key)} TEXT PRIMARY KEY, {cols})")
    return kinds


def _kind(col: Any) -> str:
    import pyarrow as pa
    import pyarrow.compute as pc

    tp = col.type
    if pa.types.is_list(tp) or pa.types.is_large_list(tp) or pa.types.is_fixed_size_list(tp):
        return "list"
    if pa.types.is_integer(tp):
        return "int"
    if pa.types.is_floating(tp):
        return "real"
    if pa.types.is_string(tp):  # CSV columns arrive as text: keep numbers as numbers
        for target, kind in ((pa.int64(), "int"), (pa.float64(), "real")):
            try:
                pc.cast(col, target)
                return kind
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
    return "text"


def _rows(chunk: Any, key: str, kinds: Mapping[str, str], pa: Any) -> list[tuple]:
    import pyarrow.compute as pc

    columns = [[_entity_text(v) for v in chunk.column(key).to_pylist()]]
    for c, kind in kinds.items():
        if c not in chunk.column_names:
            raise InvalidInput(f"column '{c}' is missing from part of the file")
        col = chunk.column(c)
        if kind == "list":
            columns.append(
                [None if v is None else orjson.dumps(v).decode() for v in col.to_pylist()]
            )
        elif kind in ("int", "real"):
            target = pa.int64() if kind == "int" else pa.float64()
            try:
                columns.append(pc.cast(col, target).to_pylist())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise InvalidInput(f"column '{c}' holds a value that is not a number") from None
        else:
            columns.append(col.to_pylist())
    return list(zip(*columns, strict=True))


def app_store(state: Any) -> FeatureStore:
    """The server's feature store (`app.state`), opened on first use."""
    store = getattr(state, "feature_store", None)
    if store is None:
        settings = state.settings
        store = FeatureStore(settings.features.resolve(settings.server.state_dir))
        state.feature_store = store
    return store


async def with_features(
    state: Any,
    config: FeatureConfig,
    specs: Sequence[TensorSpec],
    named: Mapping[str, tuple[str, np.ndarray]],
    parameters: Mapping[str, Any],
) -> Mapping[str, tuple[str, np.ndarray]]:
    """`named` with the store-fed inputs filled in, for a model that declares [features]
    (`config.table`; the data plane asks only then); the SQLite read runs off the event loop."""
    import asyncio

    return await asyncio.to_thread(
        lookup_request, app_store(state), config, specs, named, parameters
    )
