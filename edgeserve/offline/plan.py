"""Which table columns feed which model input: the mapping convention, without pyarrow.

For a model input NAME whose per-row shape holds n values (the signature's shape
without its first, batch dimension; digits: `input` [-1, 64], n = 64):

1. `--map NAME=COL`: column COL holds the row's values, as a list column (JSON Lines
   arrays, Parquet lists, feature-store list columns) or, when n = 1, a scalar column.
2. `--map NAME=PREFIX*`: the n scalar columns PREFIX0 .. PREFIX{n-1}.
3. Without `--map`: a column called NAME (list or scalar), else the n scalar columns
   NAME_0 .. NAME_{n-1}. Nothing else is guessed (digits' `pixel_0..pixel_63` need
   `--map input=pixel_*`); the error says how to map.

Values are flattened row-major, so a [3, 8, 8] input takes 192 values per row. The
same plan serves the batch CLI, server jobs, Spark and feature-store lookups, so a
model sees its features arranged the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeserve.errors import InvalidInput
from edgeserve.runtime import TensorSpec


@dataclass(frozen=True)
class InputSource:
    """Where one model input's values come from in a table."""

    input: str
    datatype: str
    row_shape: tuple[int, ...]
    columns: tuple[str, ...]  # one list/scalar column, or n scalar columns
    list_column: bool

    @property
    def size(self) -> int:
        return int(np.prod(self.row_shape)) if self.row_shape else 1


@dataclass(frozen=True)
class Wording:
    """How errors name the mapping and keep options and the table, in the caller's own
    terms: the CLI's `--map`, Spark's `input_map=`."""

    map_column: str = "--map {input}=COLUMN"
    map_prefix: str = "--map {input}=PREFIX*"
    map_option: str = "--map"
    keep_option: str = "--keep"
    table: str = "the input file"
    prefix_option: str = "--output-prefix "


CLI_WORDING = Wording()
SPARK_WORDING = Wording(
    map_column="input_map={{'{input}': 'COLUMN'}}",
    map_prefix="input_map={{'{input}': 'PREFIX*'}}",
    map_option="input_map",
    keep_option="keep",
    table="the DataFrame",
    prefix_option="output_prefix=",
)


def row_shape(spec: TensorSpec) -> tuple[int, ...]:
    """The per-row shape: the signature without its batch dimension."""
    if not spec.shape:
        raise InvalidInput(f"input '{spec.name}' is a scalar; scoring rows needs a batch dimension")
    shape = spec.shape[1:]
    if any(d < 0 for d in shape):
        raise InvalidInput(
            f"input '{spec.name}' has a variable per-row shape {list(spec.shape)}; "
            "batch scoring needs fixed dimensions after the batch one"
        )
    return tuple(shape)


def parse_map_options(values: Sequence[str]) -> dict[str, str]:
    """`--map input=column` options into a dict, refusing malformed ones."""
    mapping: dict[str, str] = {}
    for value in values:
        name, sep, column = value.partition("=")
        if not sep or not name or not column:
            raise InvalidInput(f"--map {value!r}: expected INPUT=COLUMN or INPUT=PREFIX*")
        mapping[name] = column
    return mapping


def plan_inputs(
    specs: Sequence[TensorSpec],
    columns: Sequence[str],
    explicit: Mapping[str, str] | None = None,
    skip: Sequence[str] = (),
    wording: Wording = CLI_WORDING,
) -> list[InputSource]:
    """Decide the source of every model input not in `skip` (those come from elsewhere,
    e.g. the feature store); the error names the input and the columns it looked for."""
    explicit = dict(explicit or {})
    known = {s.name for s in specs}
    for name in explicit:
        if name not in known:
            raise InvalidInput(
                f"{wording.map_option} names '{name}', which is not an input of the model"
            )
    present = set(columns)
    plan = []
    for spec in specs:
        if spec.name in skip:
            continue
        shape = row_shape(spec)
        n = int(np.prod(shape)) if shape else 1
        wanted = explicit.get(spec.name)
        if wanted is not None and wanted.endswith("*"):
            cols = tuple(f"{wanted[:-1]}{i}" for i in range(n))
            _require(cols, present, spec.name, wording)
            plan.append(InputSource(spec.name, spec.datatype, shape, cols, False))
            continue
        if wanted is not None:
            _require((wanted,), present, spec.name, wording)
            plan.append(InputSource(spec.name, spec.datatype, shape, (wanted,), n != 1))
            continue
        if spec.name in present:
            plan.append(InputSource(spec.name, spec.datatype, shape, (spec.name,), n != 1))
            continue
        cols = tuple(f"{spec.name}_{i}" for i in range(n))
        if all(c in present for c in cols):
            plan.append(InputSource(spec.name, spec.datatype, shape, cols, False))
            continue
        raise InvalidInput(
            f"no column for input '{spec.name}' ({n} values per row): expected a column "
            f"'{spec.name}' or columns '{spec.name}_0'..'{spec.name}_{n - 1}'; "
            f"map others with {wording.map_column.format(input=spec.name)} or "
            f"{wording.map_prefix.format(input=spec.name)}"
        )
    return plan


def _require(cols: Sequence[str], present: set[str], name: str, wording: Wording) -> None:
    missing = [c for c in cols if c not in present]
    if missing:
        raise InvalidInput(f"input '{name}': no column {missing[0]!r} in {wording.table}")
