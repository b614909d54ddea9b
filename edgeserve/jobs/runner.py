"""The background job runner: one low-priority thread that scores jobs chunk by chunk.

Live requests keep their latency because the runner
- is a single thread, reniced (`[jobs] nice`) so the OS prefers the inference threads;
- runs its own single-threaded copy of the model, so it never queues behind, or in
  front of, live requests in the shared executor;
- is paced before every (small) chunk by `pacing.LivePacer`: a bounded share of the
  time while live requests are being served, and only when their queue is empty.
Each chunk is a checkpoint (see `edgeserve.offline.run`): a restart resumes the job
with no row lost or written twice.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from edgeserve.config.schema import ConfigError
from edgeserve.errors import EdgeserveError, ModelNotReady
from edgeserve.jobs.admission import JobAdmission
from edgeserve.jobs.pacing import LivePacer
from edgeserve.jobs.store import (
    ACTIVE,
    DONE,
    FAILED,
    RUNNING,
    Job,
    JobStore,
    input_fingerprint,
)
from edgeserve.offline.run import RunState, run_chunks
from edgeserve.offline.scoring import ChunkScorer
from edgeserve.offline.tables import (
    TextWriter,
    columns_of,
    estimate_rows,
    open_writer,
    read_chunks,
)
from edgeserve.runtime import Runtime, RuntimeLoadError, ThreadPlan, create_runtime
from edgeserve.serving.repository import ModelConfig, read_model

log = logging.getLogger(__name__)

OUTPUT_NAMES = {"csv": "output.csv", "jsonl": "output.jsonl", "parquet": "output.parquet"}


class JobRunner:
    """Owns the job thread; routes add jobs to the store and `wake` it."""

    def __init__(
        self,
        store: JobStore,
        jobs_dir: Path,
        repository: Path,
        backend: str,
        chunk_rows: int,
        checkpoint_interval_s: float,
        nice: int,
        pacer: LivePacer,
        keep_finished_s: float = 7 * 86400.0,
        served_model: Callable[[str, int], tuple[Runtime, ModelConfig]] | None = None,
        feature_db: Path | None = None,
        admission: JobAdmission | None = None,
    ) -> None:
        self.store = store
        self.admission = admission
        self.jobs_dir = jobs_dir
        self._repository = repository
        self._backend = backend
        self._chunk_rows = chunk_rows
        self._checkpoint_interval_s = checkpoint_interval_s
        self._nice = nice
        self._pacer = pacer
        self._keep_finished_s = keep_finished_s
        self._served_model = served_model
        self._progress: tuple[str, float, int, int] | None = None  # id, t0, rows0, rows
        self._feature_db = feature_db
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._cancelled: set[str] = set()
        self._models: dict[tuple[str, int], tuple[Runtime, ModelConfig]] = {}
        self._thread = threading.Thread(target=self._main, name="edgeserve-jobs", daemon=True)

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def output_path(self, job: Job) -> Path:
        return self.job_dir(job.id) / OUTPUT_NAMES[job.output_format]

    def errors_path(self, job: Job) -> Path:
        return self.job_dir(job.id) / "errors.jsonl"

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the current chunk (which is committed); the job resumes on restart."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        self._cancelled.add(job_id)

    # -- the thread ------------------------------------------------------------------
    def _main(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: per-thread nice
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        while not self._stop.is_set():
            job = self.store.next_runnable()
            if job is None:
                self._forget_expired()
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self._run(job)
            except Exception:  # a bug must not kill the runner; the job records it
                log.exception("job crashed job=%s", job.id)
                self._finish(job.id, FAILED, "internal error while scoring (see the server log)")
            self._drop_if_cancelled(job.id)
        for runtime, _ in self._models.values():
            runtime.close()

    def _run(self, job: Job) -> None:
        started = job.started_at or time.time()
        if not self.store.set_status(job.id, RUNNING, only_from=ACTIVE, started_at=started):
            return
        log.info(
            "job start job=%s model=%s version=%s from_row=%d",
            job.id,
            job.model,
            job.version,
            job.rows_done,
        )
        try:
            source = Path(job.input_path)
            if input_fingerprint(source) != job.input_fingerprint:
                raise EdgeserveError("the input file changed after the job was created")
            runtime, config = self._model(job.model, job.version)
            opts = job.options
            scorer = ChunkScorer(
                runtime,
                config,
                columns_of(source, job.input_format),
                opts.get("map"),
                opts.get("keep", ()),
                opts.get("outputs"),
                self._feature_db,
            )
            if job.rows_total is None:
                total = estimate_rows(source, job.input_format)
                # only while still running: a cancel may have landed during the set-up
                self.store.set_status(job.id, RUNNING, only_from=(RUNNING,), rows_total=total)
            writer = open_writer(self.output_path(job), job.output_format, job.output_pos)
            errors = TextWriter(self.errors_path(job), "jsonl", job.errors_pos)
        except ModelNotReady as exc:
            if exc.headers and "Retry-After" in exc.headers:
                # installed versions load in the background after a restart: retry soon
                self._wake.wait(1.0)
                return
            self._finish(job.id, FAILED, _reason(job, exc))
            return
        except (EdgeserveError, RuntimeLoadError, ConfigError, OSError, pa.ArrowException) as exc:
            self._finish(job.id, FAILED, _reason(job, exc))
            return
        chunks = read_chunks(source, job.input_format, self._chunk_rows, job.rows_done)
        try:
            state, finished = run_chunks(
                chunks,
                scorer,
                writer,
                errors,
                _StoreCheckpoint(self.store, job.id),
                job.state,
                before_chunk=lambda: self._yield_to_live(job.id),
                checkpoint_every_s=self._checkpoint_interval_s,
                on_chunk=lambda state, _rows: self._note_progress(job.id, state.rows_done),
            )
        except (EdgeserveError, OSError, pa.ArrowException) as exc:
            writer.close()
            errors.close()
            self._finish(job.id, FAILED, _reason(job, exc))
            return
        if not finished:
            writer.close()
            errors.close()
            if job.id in self._cancelled:
                log.info("job cancelled job=%s rows_done=%d", job.id, state.rows_done)
            return
        writer.finish()
        errors.finish()
        self._finish(job.id, DONE, None)
        log.info("job done job=%s rows=%d failed=%d", job.id, state.rows_done, state.failed)

    def _drop_if_cancelled(self, job_id: str) -> None:
        """A job cancelled while it ran loses its files here, whichever way the run ended
        (stopped between chunks, or its set-up failing after the cancel: the failure is
        not recorded then, the job stays cancelled, and its files must still go)."""
        if job_id in self._cancelled:
            self._cancelled.discard(job_id)
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def _note_progress(self, job_id: str, rows: int) -> None:
        if self._progress is None or self._progress[0] != job_id:
            self._progress = (job_id, time.monotonic(), rows, rows)
        else:
            self._progress = (*self._progress[:3], rows)

    def live(self, job_id: str) -> tuple[int, float | None] | None:
        """For the running job: rows scored so far (committed or not) and rows/s since
        this process picked it up (None until there is half a second to measure)."""
        progress = self._progress
        if progress is None or progress[0] != job_id:
            return None
        _, started, rows0, rows = progress
        elapsed = time.monotonic() - started
        rate = (rows - rows0) / elapsed if elapsed > 0.5 and rows > rows0 else None
        return rows, rate

    def _forget_expired(self) -> None:
        """Finished jobs and their files are kept `keep_finished_s`, then removed, so
        a box that scores a file every day does not fill its disk."""
        for job_id in self.store.expired(time.time() - self._keep_finished_s):
            if job_id in self._cancelled:
                continue
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
            self.store.delete(job_id)
            log.info("job forgotten job=%s", job_id)

    def _finish(self, job_id: str, status: str, error: str | None) -> None:
        self.store.set_status(
            job_id, status, only_from=(RUNNING,), error=error, finished_at=time.time()
        )

    def _yield_to_live(self, job_id: str) -> bool:
        """Pace the next chunk behind live traffic; False = stop now (cancel, shutdown)."""
        return self._pacer.before_chunk(lambda: self._stop.is_set() or job_id in self._cancelled)

    def _model(self, name: str, version: int) -> tuple[Runtime, ModelConfig]:
        """A single-threaded copy of the version from the repository; a version that is
        not there (installed from a bundle) is scored with the server's own runtime."""
        key = (name, version)
        if key in self._models:
            return self._models[key]
        folder = self._repository / name
        source = read_model(folder) if (folder / "model.toml").is_file() else None
        if source is None or version not in source.versions:
            if self._served_model is None:
                raise EdgeserveError(f"model '{name}' version {version} is no longer available")
            self._models[key] = self._served_model(name, version)
            return self._models[key]
        backend = source.config.backend if source.config.backend != "auto" else self._backend
        files = source.read_files(version)
        runtime = create_runtime(backend, files, ThreadPlan(intra_op=1, inter_op=1), name)
        self._models[key] = (runtime, source.config)
        return self._models[key]


def _reason(job: Job, exc: BaseException) -> str:
    """What the job's owner is told; paths and backend internals go to the log only."""
    log.warning("job failed job=%s error=%r", job.id, str(exc)[:500])
    if isinstance(exc, EdgeserveError):
        return exc.message
    if isinstance(exc, RuntimeLoadError):
        return "the model could not be loaded (see the server log)"
    if isinstance(exc, ConfigError):
        return f"model '{job.model}' is no longer in the repository"
    if isinstance(exc, pa.ArrowException):
        first = (str(exc).strip().splitlines() or ["unreadable"])[0]
        return f"the input is not valid {job.input_format}: {first[:200]}"
    return "the job's files could not be read or written (see the server log)"


class _StoreCheckpoint:
    def __init__(self, store: JobStore, job_id: str) -> None:
        self._store = store
        self._job_id = job_id

    def save(self, state: RunState) -> None:
        self._store.save_progress(self._job_id, state)
