"""The chunk loop shared by the batch CLI and server jobs, and the CLI's checkpoint file.

Exactly-once across crashes: each chunk is appended to the output and error files,
both are fsynced, and only then is the checkpoint (rows done + both file positions)
replaced atomically. A restart cuts both files back to the checkpoint's positions and
skips the rows it counts, so a row is never lost nor written twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import orjson

from edgeserve.errors import Conflict
from updater.fsync import write_atomic

if TYPE_CHECKING:  # pyarrow stays optional for modules that only need RunState
    import pyarrow as pa

    from edgeserve.offline.scoring import ChunkScorer
    from edgeserve.offline.tables import ChunkWriter, TextWriter


@dataclass(frozen=True)
class RunState:
    """How far a run got, as last made durable."""

    rows_done: int = 0  # input rows consumed (scored + failed)
    output_pos: int = 0
    errors_pos: int = 0
    scored: int = 0
    failed: int = 0


class Checkpointer(Protocol):
    def save(self, state: RunState) -> None: ...


def run_chunks(
    chunks: Iterable[pa.Table],
    scorer: ChunkScorer,
    writer: ChunkWriter,
    errors: TextWriter,
    checkpoint: Checkpointer,
    state: RunState,
    *,
    on_chunk: Callable[[RunState, int], None] | None = None,
    before_chunk: Callable[[], bool] | None = None,
    checkpoint_every_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[RunState, bool]:
    """Score every chunk; returns the final state and whether the input was exhausted.

    `before_chunk` runs before each chunk (jobs wait there for an idle model) and may
    return False to stop early (cancel, shutdown) with everything so far committed.
    Chunks are committed together at most every `checkpoint_every_s` (0 = after each),
    so small chunks do not each pay for two fsyncs; a crash in between only loses the
    uncommitted chunks, which the next run scores again.
    """
    import pyarrow as pa

    last_commit = clock()
    pending = state  # counts including chunks written but not yet committed

    def commit() -> RunState:
        durable = replace(pending, output_pos=writer.commit(), errors_pos=errors.commit())
        checkpoint.save(durable)
        return durable

    for table in chunks:
        if before_chunk is not None and not before_chunk():
            return (commit() if pending != state else state), False
        scored = scorer.score(table, pending.rows_done)
        writer.write(scored.table)
        if scored.errors:
            errors.write(pa.Table.from_pylist(scored.errors))
        pending = replace(
            pending,
            rows_done=pending.rows_done + table.num_rows,
            scored=pending.scored + scored.table.num_rows,
            failed=pending.failed + len(scored.errors),
        )
        if clock() - last_commit >= checkpoint_every_s:
            state = pending = commit()
            last_commit = clock()
        if on_chunk is not None:
            on_chunk(pending, table.num_rows)
    if pending != state:
        state = commit()
    return state, True


@dataclass(frozen=True)
class FileCheckpoint:
    """`<output>.checkpoint.json`, tied to the input file and the model it scored with."""

    path: Path
    fingerprint: dict

    @classmethod
    def for_output(cls, output: Path, input_path: Path, model: str, version: int) -> FileCheckpoint:
        st = input_path.stat()
        fingerprint = {
            "input": str(input_path.resolve()),
            "input_bytes": st.st_size,
            "input_mtime_ns": st.st_mtime_ns,
            "model": model,
            "version": version,
        }
        return cls(output.with_name(output.name + ".checkpoint.json"), fingerprint)

    def load(self) -> RunState | None:
        """The saved state, or None; refuses one written for another input or model."""
        try:
            doc = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        if doc.get("fingerprint") != self.fingerprint:
            raise Conflict(
                f"{self.path.name} belongs to another input file or model version; "
                "delete it to start over"
            )
        return RunState(**doc["state"])

    def save(self, state: RunState) -> None:
        doc = orjson.dumps({"fingerprint": self.fingerprint, "state": asdict(state)})
        write_atomic(self.path, doc, 0o644)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
