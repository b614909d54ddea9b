"""One offline scoring run of the CLI: model, input, output, checkpoint and progress."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeserve.errors import Conflict
from edgeserve.offline.model import LoadedModel, SlotLoader, load_model
from edgeserve.offline.plan import parse_map_options
from edgeserve.offline.run import FileCheckpoint, RunState, run_chunks
from edgeserve.offline.scoring import ChunkScorer
from edgeserve.offline.tables import (
    TextWriter,
    columns_of,
    estimate_rows,
    format_of,
    open_writer,
    read_chunks,
)
from edgeserve.runtime import ThreadPlan

log = logging.getLogger(__name__)


@dataclass
class BatchJob:
    model: LoadedModel
    scorer: ChunkScorer
    input_path: Path
    input_format: str
    output: Path
    output_format: str
    errors_path: Path
    chunk_rows: int
    checkpoint: FileCheckpoint

    @classmethod
    def prepare(
        cls,
        *,
        model_ref: str,
        input_path: Path,
        output: Path,
        repository: Path,
        maps: Sequence[str] = (),
        keep: Sequence[str] = (),
        output_names: Sequence[str] = (),
        output_prefix: str = "",
        errors_path: Path | None = None,
        chunk_rows: int = 65536,
        input_format: str | None = None,
        output_format: str | None = None,
        features_db: Path | None = None,
        backend: str = "onnxruntime",
        threads: ThreadPlan | None = None,
        slot_loader: SlotLoader | None = None,
    ) -> BatchJob:
        """Check everything that can be checked before the first row is read."""
        in_fmt = format_of(input_path, input_format)
        out_fmt = format_of(output, output_format)
        model = load_model(repository, model_ref, backend, threads, slot_loader)
        scorer = ChunkScorer(
            model.runtime,
            model.config,
            columns_of(input_path, in_fmt),
            parse_map_options(maps),
            keep,
            output_names or None,
            features_db,
            output_prefix=output_prefix,
        )
        return cls(
            model,
            scorer,
            input_path,
            in_fmt,
            output,
            out_fmt,
            errors_path or output.with_name(output.name + ".errors.jsonl"),
            chunk_rows,
            FileCheckpoint.for_output(output, input_path, model.name, model.version),
        )

    def run(self, resume: bool = False, progress: bool = True) -> RunState:
        saved = self.checkpoint.load()
        if saved is not None and not resume:
            raise Conflict(
                f"an interrupted run left {self.checkpoint.path.name}: pass --resume to "
                "continue it, or delete it to start over"
            )
        if resume and saved is None:
            log.info("no checkpoint output=%s: scoring from the first row", self.output)
        state = saved or RunState()
        # before any file is opened: nothing is left behind when it cannot start
        bar = _progress_bar(
            estimate_rows(self.input_path, self.input_format), state.rows_done, progress
        )
        writer = open_writer(self.output, self.output_format, state.output_pos)
        errors = TextWriter(self.errors_path, "jsonl", state.errors_pos)
        try:
            state, _ = run_chunks(
                read_chunks(self.input_path, self.input_format, self.chunk_rows, state.rows_done),
                self.scorer,
                writer,
                errors,
                self.checkpoint,
                state,
                on_chunk=lambda _state, rows: bar.update(rows),
            )
            writer.finish()
            errors.finish()
        finally:
            bar.close()
        self.checkpoint.remove()
        if state.failed == 0:
            self.errors_path.unlink(missing_ok=True)
        return state


class _NoBar:
    """Stands in for tqdm when it is not installed (`[spark]` without `[batch]`)."""

    def update(self, rows: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int | None, done: int, enabled: bool) -> Any:
    try:
        from tqdm import tqdm
    except ImportError:
        if enabled:
            log.info("no progress bar: tqdm is not installed (pip install 'edgeserve[batch]')")
        return _NoBar()
    return tqdm(
        total=total,
        initial=done,
        unit="rows",
        unit_scale=True,
        file=sys.stderr,
        disable=not enabled,
        smoothing=0.1,
        dynamic_ncols=True,
    )
