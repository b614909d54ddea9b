"""HTTP for updates: upload a bundle, read the update status, roll back by hand.

`BundleRejected` reasons map to statuses here, the one place that knows both:
too large 413, not newer than what was installed 409, anything else wrong with the
bundle 400. The reason code is returned beside the message for scripts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edgeserve.auth.guard import requires
from edgeserve.errors import (
    Conflict,
    InvalidInput,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
)
from edgeserve.protocol.integers import parse_uint
from edgeserve.updates.service import UpdateManager
from updater import BundleRejected, StoreError
from updater.fsync import temp_name
from updater.manifest import MODEL_NAME

log = logging.getLogger(__name__)

JSON = "application/json"
REJECT_STATUS = {"too_large": 413, "not_newer": 409}
UPLOAD_CHUNK_LIMIT = 1024 * 1024


def _json(doc: object, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type=JSON)


def rejection_response(exc: BundleRejected) -> Response:
    status = REJECT_STATUS.get(exc.reason, 400)
    return _json({"error": f"bundle rejected: {exc}", "reason": exc.reason}, status)


def _manager(request: Request) -> UpdateManager:
    manager = getattr(request.app.state, "updates", None)
    if manager is None:
        raise NotFound("updates are switched off ([updater] enabled = false)")
    return manager


def _model(request: Request) -> str:
    name = request.path_params["model"]
    if not MODEL_NAME.match(name):
        raise ModelNotFound(f"unknown model '{name[:64]}'")
    return name


def _audit(request: Request, action: str, target: str, outcome: str, detail: dict) -> None:
    audit = getattr(request.app.state, "audit", None)
    if audit is None:
        return
    principal = getattr(request.state, "principal", None)
    subject = getattr(principal, "subject", "") or ""
    with contextlib.suppress(Exception):  # the audit log never breaks the action
        audit.record(action, target, outcome, subject=subject, detail=detail)


async def _receive(request: Request, folder: Path, max_bytes: int) -> Path:
    """Stream the body to a private temp file, refusing it once it passes `max_bytes`."""
    declared = parse_uint(request.headers.get("content-length"))
    if declared is not None and declared > max_bytes:
        raise PayloadTooLarge(f"bundle of {declared} bytes exceeds the limit of {max_bytes}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A temp name with our pid: if we are killed mid-upload, recovery removes it.
    path = temp_name(folder / "upload.bundle")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    received = 0
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in request.stream():
                received += len(chunk)
                if received > max_bytes:
                    raise PayloadTooLarge(f"bundle exceeds the limit of {max_bytes} bytes")
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if received == 0:
        path.unlink(missing_ok=True)
        raise InvalidInput("empty body: send the bundle file as the request body")
    return path


@requires("admin")
async def upload_bundle(request: Request) -> Response:
    """POST /api/models/{model}/bundles?allow_downgrade=true: install a bundle file."""
    manager = _manager(request)
    name = _model(request)
    downgrade = request.query_params.get("allow_downgrade", "false").lower() in ("1", "true")
    if manager.busy(name):
        raise Conflict(f"an update of {name} is already in progress; retry when it is done")
    settings = request.app.state.settings
    incoming = settings.server.state_dir / "incoming"
    path = await _receive(request, incoming, settings.updater.max_bundle_bytes)
    try:
        result = await manager.install(
            path, model=name, allow_downgrade=downgrade, reason="uploaded over HTTP"
        )
    except BundleRejected as exc:
        log.warning("bundle rejected model=%s reason=%s", name, exc.reason)
        _audit(request, "update.install", name, "rejected", {"reason": exc.reason})
        return rejection_response(exc)
    finally:
        path.unlink(missing_ok=True)
    detail = {"version": result.version, "previous": result.previous_version}
    if result.downgrade:
        detail["downgrade"] = True
    _audit(request, "update.install", name, "ok", detail)
    return _json(
        {
            "model": result.model,
            "version": result.version,
            "slot": result.slot,
            "previous_version": result.previous_version,
            "downgrade": result.downgrade,
            "verdict": "probation",
        },
        201,
    )


@requires("read")
async def update_status(request: Request) -> Response:
    """GET /api/models/{model}/update: slots, versions, verdict, history, live watch."""
    manager = _manager(request)
    name = _model(request)
    doc = await asyncio.to_thread(manager.status, name)  # reads the journal under its lock
    if doc["active"] is None and name not in manager.registry.names():
        raise ModelNotFound(f"unknown model '{name}'")
    return _json(doc)


@requires("admin")
async def rollback(request: Request) -> Response:
    """POST /api/models/{model}/rollback, optional body {"reason": "..."}."""
    manager = _manager(request)
    name = _model(request)
    body = await request.body()
    reason = "rolled back by hand over HTTP"
    if body.strip():
        try:
            doc = orjson.loads(body[:65536])
        except orjson.JSONDecodeError:
            raise InvalidInput("request body is not valid JSON") from None
        if isinstance(doc, dict) and isinstance(doc.get("reason"), str):
            reason = doc["reason"][:500]
    if name not in manager.store.model_names():
        raise ModelNotFound(f"model '{name}' has no installed version to roll back")
    try:
        journal = await manager.rollback(name, reason)
    except StoreError as exc:
        _audit(request, "update.rollback", name, "refused", {"error": exc.message})
        raise Conflict(exc.message) from None
    _audit(request, "update.rollback", name, "ok", {"reason": reason})
    return _json(
        {"model": name, "active_version": journal.active_version, "verdict": journal.verdict}
    )


ROUTES = [
    Route("/api/models/{model:str}/bundles", upload_bundle, methods=["POST"]),
    Route("/api/models/{model:str}/update", update_status, methods=["GET"]),
    Route("/api/models/{model:str}/rollback", rollback, methods=["POST"]),
]
