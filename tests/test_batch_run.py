"""The chunk loop's exactly-once contract, with batched checkpoints and a crash midway."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from edgeserve.offline.run import RunState, run_chunks
from edgeserve.offline.scoring import ScoredChunk
from edgeserve.offline.tables import TextWriter, open_writer


class Crash(Exception):
    pass


class Doubler:
    """A stand-in scorer: `row` and `value * 2`; odd values are row errors; can crash."""

    def __init__(self, crash_at_row: int | None = None) -> None:
        self.crash_at_row = crash_at_row

    def score(self, table: pa.Table, first_row: int) -> ScoredChunk:
        if self.crash_at_row is not None and first_row >= self.crash_at_row:
            raise Crash
        values = table.column("v").to_pylist()
        rows = [first_row + i for i, v in enumerate(values) if v % 7]
        out = pa.table({"row": rows, "double": [2 * v for v in values if v % 7]})
        errors = [
            {"row": first_row + i, "error": "seven"} for i, v in enumerate(values) if not v % 7
        ]
        return ScoredChunk(out, errors)


class Saves:
    def __init__(self) -> None:
        self.states: list[RunState] = []

    def save(self, state: RunState) -> None:
        self.states.append(state)


def chunks(start: int, total: int = 100, size: int = 10):
    for first in range(start, total, size):
        yield pa.table({"v": list(range(first, min(first + size, total)))})


def tick() -> object:
    now = [0.0]

    def clock() -> float:
        now[0] += 0.3
        return now[0]

    return clock


def run(tmp_path: Path, state: RunState, saves: Saves, scorer: Doubler) -> tuple[RunState, bool]:
    writer = open_writer(tmp_path / "out.jsonl", "jsonl", state.output_pos)
    errors = TextWriter(tmp_path / "errors.jsonl", "jsonl", state.errors_pos)
    try:
        return run_chunks(
            chunks(state.rows_done),
            scorer,
            writer,
            errors,
            saves,
            state,
            checkpoint_every_s=1.0,
            clock=tick(),
        )
    finally:
        writer.close()
        errors.close()


def test_checkpoints_are_batched_by_time_and_the_last_one_is_complete(tmp_path: Path) -> None:
    saves = Saves()
    state, finished = run(tmp_path, RunState(), saves, Doubler())
    assert finished and state.rows_done == 100
    assert 1 < len(saves.states) < 10  # fewer checkpoints than chunks
    assert saves.states[-1] == state
    assert state.scored + state.failed == 100


@pytest.mark.parametrize("crash_at_row", [0, 10, 30, 70, 90])
def test_a_crash_between_checkpoints_loses_and_repeats_nothing_after_resume(
    tmp_path: Path, crash_at_row: int
) -> None:
    saves = Saves()
    with pytest.raises(Crash):
        run(tmp_path, RunState(), saves, Doubler(crash_at_row))
    durable = saves.states[-1] if saves.states else RunState()
    assert durable.rows_done <= crash_at_row
    state, finished = run(tmp_path, durable, Saves(), Doubler())
    assert finished
    rows = [json.loads(line)["row"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    failed = [
        json.loads(line)["row"] for line in (tmp_path / "errors.jsonl").read_text().splitlines()
    ]
    assert sorted(rows + failed) == list(range(100))
    assert failed == list(range(0, 100, 7))
    assert state.scored == len(rows) and state.failed == len(failed)
