"""Chunked readers and crash-safe writers for CSV, JSON Lines and Parquet.

Readers yield tables of exactly `chunk_rows` rows (the last may be shorter) without
ever holding the whole file, and can skip the rows a previous run already committed.
Writers append one chunk at a time and report a durable *position* (bytes for text
formats, part files for Parquet); after a crash, `restore(position)` cuts whatever
was written past the last checkpoint, so no row is lost or written twice.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, Protocol

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from edgeserve.errors import InvalidInput
from updater.fsync import publish

FORMATS = ("csv", "jsonl", "parquet")
_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
CSV_BLOCK_BYTES = 4 * 1024 * 1024


def format_of(path: Path, explicit: str | None = None) -> str:
    """The file format, from `explicit` or the file's suffix."""
    if explicit:
        if explicit not in FORMATS:
            raise InvalidInput(f"unknown format {explicit!r} (choose from {', '.join(FORMATS)})")
        return explicit
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise InvalidInput(f"cannot tell the format of {path.name}: use .csv, .jsonl or .parquet")
    return fmt


def count_rows(path: Path, fmt: str) -> int | None:
    """Row count when the file knows it cheaply (Parquet metadata), else None."""
    if fmt == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    return None


def estimate_rows(path: Path, fmt: str) -> int:
    """Exact for Parquet; for text files the line count, cheap next to scoring, which
    gives progress bars and job status an ETA."""
    exact = count_rows(path, fmt)
    if exact is not None:
        return exact
    lines = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            lines += block.count(b"\n")
    return max(0, lines - (1 if fmt == "csv" else 0))


def columns_of(path: Path, fmt: str) -> list[str]:
    """Column names, read from the header, the schema or the first line."""
    if fmt == "parquet":
        return list(pq.ParquetFile(path).schema_arrow.names)
    if fmt == "csv":
        return _csv_header(path)
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                doc = orjson.loads(line)
                return list(doc) if isinstance(doc, dict) else []
    return []


def read_chunks(path: Path, fmt: str, chunk_rows: int, skip_rows: int = 0) -> Iterator[pa.Table]:
    """Tables of `chunk_rows` rows from row `skip_rows` on; memory stays at a few chunks."""
    if fmt == "parquet":
        batches, skip_rows = _parquet_batches(path, chunk_rows, skip_rows)
    elif fmt == "csv":
        batches = _csv_batches(path)
    else:
        batches = _jsonl_batches(path, chunk_rows)
    yield from _rechunk(batches, chunk_rows, skip_rows)


def _rechunk(batches: Iterator[pa.Table], chunk_rows: int, skip_rows: int) -> Iterator[pa.Table]:
    pending: list[pa.Table] = []
    held = 0
    for table in batches:
        if skip_rows:
            if table.num_rows <= skip_rows:
                skip_rows -= table.num_rows
                continue
            table = table.slice(skip_rows)
            skip_rows = 0
        pending.append(table)
        held += table.num_rows
        while held >= chunk_rows:
            merged = pa.concat_tables(pending, promote_options="permissive")
            yield merged.slice(0, chunk_rows)
            rest = merged.slice(chunk_rows)
            pending, held = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
    if held:
        yield pa.concat_tables(pending, promote_options="permissive")


def _parquet_batches(path: Path, chunk_rows: int, skip_rows: int) -> tuple[Iterator[pa.Table], int]:
    """Batches from the first row group not wholly skipped, and the rows left to skip."""
    pf = pq.ParquetFile(path)
    groups = []
    for i in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(i).num_rows
        if not groups and skip_rows >= rows:
            skip_rows -= rows
            continue
        groups.append(i)
    batches = pf.iter_batches(batch_size=chunk_rows, row_groups=groups)
    return (pa.Table.from_batches([b]) for b in batches), skip_rows


def _csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def _csv_batches(path: Path) -> Iterator[pa.Table]:
    # Every column is read as text and converted per input later, so that one bad
    # value fails its row instead of the type inference of a whole block.
    names = _csv_header(path)
    reader = pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}, strings_can_be_null=True
        ),
    )
    for batch in reader:
        yield pa.Table.from_batches([batch])


def _jsonl_batches(path: Path, chunk_rows: int) -> Iterator[pa.Table]:
    # Parsed line by line so that a bad line becomes a row error, not a failed file.
    with path.open("rb") as f:
        rows: list[dict] = []
        for line in f:
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                doc = None
            rows.append(doc if isinstance(doc, dict) else {"__invalid__": True})
            if len(rows) >= chunk_rows:
                yield _rows_table(rows)
                rows = []
        if rows:
            yield _rows_table(rows)


def _rows_table(rows: list[dict]) -> pa.Table:
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        # mixed types in a column: keep each value as JSON text, converted per row later
        names: dict[str, None] = {}
        for row in rows:
            names.update(dict.fromkeys(row))
        return pa.table(
            {
                n: pa.array(
                    [None if r.get(n) is None else orjson.dumps(r[n]).decode() for r in rows],
                    pa.string(),
                )
                for n in names
            }
        )


class ChunkWriter(Protocol):
    """Appends scored chunks; `commit` makes them durable and returns the position."""

    def write(self, table: pa.Table) -> None: ...

    def commit(self) -> int: ...

    def finish(self) -> None: ...

    def close(self) -> None: ...


class TextWriter:
    """CSV or JSON Lines appended to one file; the position is its size in bytes."""

    def __init__(self, path: Path, fmt: str, position: int = 0) -> None:
        self.path = path
        self.fmt = fmt
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if path.exists() and position else "wb"
        self._file = path.open(mode)
        self._file.truncate(position)  # drop what was written after the last checkpoint
        self._file.seek(position)
        self._header = position > 0

    def write(self, table: pa.Table) -> None:
        if self.fmt == "csv":
            buffer = BytesIO()
            pacsv.write_csv(
                _flatten_lists(table),
                buffer,
                write_options=pacsv.WriteOptions(include_header=not self._header),
            )
            self._header = True
            self._file.write(buffer.getvalue())
        else:
            self._file.write(jsonl_bytes(table))

    def commit(self) -> int:
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def finish(self) -> None:
        self.commit()
        self._file.close()

    def close(self) -> None:
        """Stop without finishing (a job paused by shutdown or cancel)."""
        self._file.close()


class ParquetPartsWriter:
    """Parquet cannot be appended to after a crash, so each chunk becomes one part file
    (written atomically) and `finish` streams the parts into the final file."""

    def __init__(self, path: Path, position: int = 0) -> None:
        self.path = path
        self.parts = path.with_name(path.name + ".parts")
        self.parts.mkdir(parents=True, exist_ok=True)
        for part in self.parts.glob("part-*.parquet"):
            if int(part.stem.split("-")[1]) >= position:
                part.unlink()  # written after the last checkpoint
        self._count = position
        self._pending: list[pa.Table] = []

    def write(self, table: pa.Table) -> None:
        self._pending.append(table)

    def commit(self) -> int:
        if self._pending:
            table = pa.concat_tables(self._pending, promote_options="permissive")
            self._pending = []
            final = self.parts / f"part-{self._count:08d}.parquet"
            publish(final, lambda f: pq.write_table(table, f), mode=0o644)
            self._count += 1
        return self._count

    def close(self) -> None:
        """Stop without finishing: committed parts stay for the next run."""
        self._pending = []

    def finish(self) -> None:
        self.commit()
        parts = sorted(self.parts.glob("part-*.parquet"))

        def fill(out: BinaryIO) -> None:
            writer: pq.ParquetWriter | None = None
            for part in parts:
                table = pq.read_table(part)
                if writer is None:
                    writer = pq.ParquetWriter(out, table.schema)
                writer.write_table(table.cast(writer.schema))
            if writer is None:
                pq.write_table(pa.table({"row": pa.array([], pa.int64())}), out)
            else:
                writer.close()

        publish(self.path, fill, mode=0o644)
        shutil.rmtree(self.parts)


def open_writer(path: Path, fmt: str, position: int = 0) -> TextWriter | ParquetPartsWriter:
    if fmt == "parquet":
        return ParquetPartsWriter(path, position)
    return TextWriter(path, fmt, position)


def jsonl_bytes(table: pa.Table) -> bytes:
    """One JSON object per row; list columns stay lists."""
    return b"".join(orjson.dumps(row) + b"\n" for row in table.to_pylist())


def _flatten_lists(table: pa.Table) -> pa.Table:
    """CSV has no lists: a list column `p` of k values becomes columns p_0 .. p_{k-1}."""
    columns: dict[str, pa.Array] = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_fixed_size_list(col.type):
            width = col.type.list_size
            values = col.combine_chunks().flatten().to_numpy(zero_copy_only=False)
            matrix = values.reshape(-1, width)
            for i in range(width):
                columns[f"{name}_{i}"] = pa.array(matrix[:, i])
        else:
            columns[name] = col
    return pa.table(columns)
