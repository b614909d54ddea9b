"""HTTP API of async jobs: submit, status, result, cancel.

`POST /api/jobs` takes either
- the input file as the body (CSV, JSON Lines or Parquet; format from Content-Type or
  `?format=`), with the job spec in the query: `?model=digits&map=input%3Dpixel_*`; or
- a JSON spec `{"model": ..., "path": "/srv/data/x.parquet", ...}` naming a file under
  one of `[jobs] input_dirs` (needs the `admin` scope: it reads the server's disk).
Spec keys: model, version, output_format (jsonl|csv|parquet), map (["input=COL"]),
keep ([columns]), outputs ([names]). Scope `infer` for everything else; a caller sees
only its own jobs unless it has `admin`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from edgeserve.auth.guard import requires
from edgeserve.errors import (
    Conflict,
    Forbidden,
    InsufficientStorage,
    InvalidInput,
    NotFound,
    Overloaded,
    PayloadTooLarge,
)
from edgeserve.http.bounds import JOBS_ACTIVE, JOBS_DISK
from edgeserve.jobs.admission import UploadBudget
from edgeserve.jobs.store import (
    ACTIVE,
    CANCELLED,
    DONE,
    MAX_JOB_ID_CHARS,
    QUEUED,
    RUNNING,
    Job,
    input_fingerprint,
    new_job_id,
    pod_name,
)
from edgeserve.offline.plan import parse_map_options, plan_inputs
from edgeserve.protocol.integers import parse_uint

if TYPE_CHECKING:
    from edgeserve.jobs.runner import JobRunner

JSON = "application/json"
_CONTENT_TYPES = {
    "text/csv": "csv",
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/vnd.apache.parquet": "parquet",
    "application/x-parquet": "parquet",
}
_MEDIA = {
    "csv": "text/csv",
    "jsonl": "application/x-ndjson",
    "parquet": "application/vnd.apache.parquet",
}


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON, headers=headers)


def _runner(request: Request) -> JobRunner:
    runner = getattr(request.app.state, "jobs", None)
    if runner is None:
        raise NotFound("async jobs are disabled on this server ([jobs] enabled = false)")
    return runner


def _is_admin(request: Request) -> bool:
    return "admin" in request.state.principal.scopes


def _owned(request: Request, runner: JobRunner) -> Job:
    job = runner.store.get(request.path_params["job_id"][:MAX_JOB_ID_CHARS])
    if job is None or (job.owner != request.state.principal.subject and not _is_admin(request)):
        raise NotFound("no such job")
    return job


def job_doc(job: Job, live: tuple[int, float | None] | None = None) -> dict[str, Any]:
    """The job as clients see it. `rows_committed` survive a crash; a running job's
    `rows_done` also counts rows scored since the last checkpoint (`live`)."""
    rows_done = max(job.rows_done, live[0]) if live and job.status == RUNNING else job.rows_done
    rate = live[1] if live and job.status == RUNNING else None
    doc: dict[str, Any] = {
        "id": job.id,
        "model": job.model,
        "version": str(job.version),
        "status": job.status,
        "rows_total": job.rows_total,
        "rows_done": rows_done,
        "rows_committed": job.rows_done,
        "scored": job.scored,
        "failed": job.failed,
        "progress": round(rows_done / job.rows_total, 4) if job.rows_total else None,
        "output_format": job.output_format,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }
    if rate:
        doc["rows_per_s"] = round(rate, 1)
        if job.rows_total:
            doc["eta_s"] = round(max(0, job.rows_total - rows_done) / rate, 1)
    if job.error:
        doc["error"] = job.error
    if job.status == DONE:
        doc["result"] = f"/api/jobs/{job.id}/result"
        if job.failed:
            doc["errors"] = f"/api/jobs/{job.id}/errors"
    return doc


@requires("infer")
async def create_job(request: Request) -> Response:
    runner = _runner(request)
    admission = runner.admission
    assert admission is not None  # start_jobs always gives one
    try:
        admission.slots.acquire()  # before any await: no check-then-act race
    except Overloaded:
        _count_bound(request, JOBS_ACTIVE)
        raise
    try:
        return await _create_job(request, runner, admission.uploads)
    except InsufficientStorage:
        _count_bound(request, JOBS_DISK)
        raise
    finally:
        admission.slots.release()


def _count_bound(request: Request, bound: str) -> None:
    bounds = getattr(request.app.state, "bounds", None)  # set by edgeserve/server.py
    if bounds is not None:
        bounds.hit(bound)


async def _create_job(request: Request, runner: JobRunner, uploads: UploadBudget) -> Response:
    settings = request.app.state.settings.jobs
    job_id = new_job_id(pod_name())
    folder = runner.job_dir(job_id)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type == JSON:
            if not _is_admin(request):
                raise Forbidden("reading a server path needs the 'admin' scope; upload instead")
            spec = _spec_from_json(await _small_body(request))
            source, fmt = _allowed_path(spec.get("path"), settings.input_dirs, spec.get("format"))
        else:
            spec = _spec_from_query(request)
            fmt = spec.get("format") or _CONTENT_TYPES.get(content_type)
            if fmt not in ("csv", "jsonl", "parquet"):
                raise InvalidInput(
                    "say the upload's format: Content-Type text/csv, "
                    "application/x-ndjson or application/vnd.apache.parquet"
                )
            source = folder / f"input.{fmt}"
            await _receive_upload(request, source, settings.max_upload_bytes, uploads)
        job = await asyncio.to_thread(_validated_job, request, job_id, spec, source, fmt)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    job = runner.store.add(job)
    runner.wake()
    return _json(job_doc(job), 202, {"location": f"/api/jobs/{job.id}"})


def _validated_job(request: Request, job_id: str, spec: dict, source: Path, fmt: str) -> Job:
    """Refuse a job whose columns cannot feed the model now, not an hour later."""
    from edgeserve.offline.tables import columns_of

    pipeline = request.app.state.pipeline
    model = pipeline.resolve(str(spec["model"]), spec.get("version"), count=False)
    pipeline.refuse_killed(model.name)  # the kill switch holds for batch jobs too
    mapping = parse_map_options(spec.get("map", []))
    skip = model.config.features.inputs if model.config.features.table else []
    try:
        columns = columns_of(source, fmt)
    except Exception:
        raise InvalidInput(f"the input is not readable as {fmt}") from None
    plan_inputs(model.inputs, columns, mapping, skip)
    entity = model.config.features.entity
    if skip and entity not in columns:
        raise InvalidInput(f"the model reads features by entity id: no column '{entity}'")
    out_fmt = spec.get("output_format", "jsonl")
    if out_fmt not in ("csv", "jsonl", "parquet"):
        raise InvalidInput("output_format must be csv, jsonl or parquet")
    options = {
        "map": mapping,
        "keep": list(spec.get("keep", [])),
        "outputs": list(spec.get("outputs", [])) or None,
    }
    return Job(
        id=job_id,
        owner=request.state.principal.subject,
        model=model.name,
        version=model.version,
        input_path=str(source),
        input_format=fmt,
        input_fingerprint=input_fingerprint(source),
        output_format=out_fmt,
        options=options,
    )


def _spec_from_query(request: Request) -> dict[str, Any]:
    q = request.query_params
    if "model" not in q:
        raise InvalidInput("query parameter 'model' is required")
    spec: dict[str, Any] = {
        "model": q["model"],
        "map": q.getlist("map"),
        "keep": q.getlist("keep"),
        "outputs": q.getlist("outputs"),
    }
    for key in ("version", "format", "output_format"):
        if key in q:
            spec[key] = q[key]
    return spec


def _spec_from_json(body: bytes) -> dict[str, Any]:
    try:
        spec = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidInput("the job spec is not valid JSON") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
        raise InvalidInput("the job spec needs a 'model' string")
    for key in ("map", "keep", "outputs"):
        value = spec.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidInput(f"'{key}' must be a list of strings")
    if spec.get("version") is not None:
        spec["version"] = str(spec["version"])
    return spec


def _allowed_path(raw: Any, roots: list[Path], fmt: str | None) -> tuple[Path, str]:
    from edgeserve.offline.tables import format_of

    if not isinstance(raw, str) or not raw:
        raise InvalidInput("the job spec needs 'path' (or upload the file as the body)")
    path = Path(raw).resolve()
    if not any(path.is_relative_to(root.resolve()) for root in roots):
        raise Forbidden("the path is not under an allowed input folder ([jobs] input_dirs)")
    if not path.is_file():
        raise InvalidInput("no such input file")
    return path, format_of(path, fmt)


async def _small_body(request: Request, limit: int = 64 * 1024) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge("the job spec is too large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _receive_upload(request: Request, path: Path, limit: int, uploads: UploadBudget) -> None:
    declared = parse_uint(request.headers.get("content-length"))
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes")
    subject = request.state.principal.subject
    runner = _runner(request)
    usage = await asyncio.to_thread(uploads.usage, runner.store.ids_of(subject))
    upload = uploads.open(subject, usage, declared)  # a declared size is judged up front
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    try:
        with path.open("wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes")
                upload.take(len(chunk))
                f.write(chunk)
            await asyncio.to_thread(os.fsync, f.fileno())
    finally:
        upload.close()  # its bytes are on disk now (counted there) or removed
    if size == 0:
        raise InvalidInput("the upload is empty")


@requires("infer")
async def list_jobs(request: Request) -> Response:
    runner = _runner(request)
    owner = None if _is_admin(request) else request.state.principal.subject
    return _json({"jobs": [job_doc(j) for j in runner.store.list(owner)]})


@requires("infer")
async def get_job(request: Request) -> Response:
    runner = _runner(request)
    job = _owned(request, runner)
    return _json(job_doc(job, runner.live(job.id)))


@requires("infer")
async def job_result(request: Request) -> Response:
    runner = _runner(request)
    job = _owned(request, runner)
    if job.status != DONE:
        raise Conflict(f"job is {job.status}; the result is ready when it is done")
    path = runner.output_path(job)
    return FileResponse(path, media_type=_MEDIA[job.output_format], filename=path.name)


@requires("infer")
async def job_errors(request: Request) -> Response:
    runner = _runner(request)
    job = _owned(request, runner)
    if job.status != DONE:
        raise Conflict(f"job is {job.status}; row errors are ready when it is done")
    path = runner.errors_path(job)
    if not path.exists():
        return Response(b"", media_type=_MEDIA["jsonl"])
    return FileResponse(path, media_type=_MEDIA["jsonl"], filename="errors.jsonl")


@requires("infer")
async def delete_job(request: Request) -> Response:
    """Cancel an active job (its files go), or forget a finished one."""
    runner = _runner(request)
    job = _owned(request, runner)
    store = runner.store
    if store.set_status(job.id, CANCELLED, only_from=(QUEUED,)):
        shutil.rmtree(runner.job_dir(job.id), ignore_errors=True)
    elif store.set_status(job.id, CANCELLED, only_from=(RUNNING,)):
        runner.cancel(job.id)  # the runner stops after its chunk and removes the files
    elif job.status not in ACTIVE:
        shutil.rmtree(runner.job_dir(job.id), ignore_errors=True)
        store.delete(job.id)
        return _json({"id": job.id, "status": "deleted"})
    fresh = store.get(job.id)
    return _json(job_doc(fresh) if fresh else {"id": job.id, "status": CANCELLED})


ROUTES = [
    Route("/api/jobs", create_job, methods=["POST"]),
    Route("/api/jobs", list_jobs, methods=["GET"]),
    Route("/api/jobs/{job_id:str}", get_job, methods=["GET"]),
    Route("/api/jobs/{job_id:str}", delete_job, methods=["DELETE"]),
    Route("/api/jobs/{job_id:str}/result", job_result, methods=["GET"]),
    Route("/api/jobs/{job_id:str}/errors", job_errors, methods=["GET"]),
]
