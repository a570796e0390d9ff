"""``GET /v1/weights`` (what is served) and ``POST /v1/update_weights`` (load a version and swap it in), and the two
phases a fleet flips with: ``POST /v1/weights/prepare`` (ready, not served), ``/v1/weights/commit`` (served) and
``/v1/weights/abort`` (dropped). Each answers SGLang's ``{success, message, version, ...}``; a failed one adds
OpenAI's ``error`` object. All but the ``GET`` need the admin token when the server has one."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

import kernels
from infer.routes.common import ErrorReply, error
from infer.updates import (
    NotPrepared,
    RestoreFailed,
    SnapshotRejected,
    StorageUnavailable,
    UpdateBusy,
    UpdateError,
    WeightInfo,
)
from infer.weights import PREPARE_TTL

router = APIRouter()

UPDATE_PATH = "/v1/update_weights"
PREPARE_PATH, COMMIT_PATH, ABORT_PATH = "/v1/weights/prepare", "/v1/weights/commit", "/v1/weights/abort"
STATUS = {UpdateBusy: 409, NotPrepared: 409, SnapshotRejected: 400, StorageUnavailable: 503, RestoreFailed: 500}
REFUSED = {401: "unauthorized", 403: "forbidden"}  # baton_weight_updates outcomes of updates refused at the door


class UpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    snapshot_root: str | None = None
    rank: int | None = None
    verify: str | None = None


class PrepareRequest(UpdateRequest):
    ttl_s: float = PREPARE_TTL  # dropped when no commit came within this many seconds


class VersionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = None  # commit: required; abort: only this version (any, when unset)


def admin(request: Request, authorization: str | None = Header(None)) -> None:
    token = request.app.state.admin_token
    if token is None:
        return
    if not authorization or not authorization.startswith("Bearer "):
        raise ErrorReply(401, "this server needs an admin token: send 'Authorization: Bearer <token>'")
    if not hmac.compare_digest(authorization[7:].encode(), token.encode()):
        raise ErrorReply(403, "the admin token is wrong")


@router.get("/v1/weights")
def weights(request: Request) -> dict:
    manager = request.app.state.manager
    info = manager.info
    described = info.to_json() if info else {k: None for k in ("version", "snapshot_root", "rank", "source_level",
                                                                "source", "loaded_at", "bytes", "seconds", "digest",
                                                                "load_path")}
    prepared, spare = manager.prepared, manager.spare
    return described | {"mode": manager.mode, "tp_size": manager.tp_size, "model": request.app.state.model_name,
                        "prepared": prepared.to_json() if prepared else None,
                        "spare": spare.version if spare else None,
                        "healthy": manager.healthy, "problem": manager.broken, "updating": manager.updating,
                        "machine": kernels.fingerprint()}


def refused(manager, status: int, message: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    """An update refused before it reached the manager (auth, schema, method): counted, and answered in both
    conventions."""
    manager.metrics.update_done(REFUSED.get(status, "invalid_request" if status < 500 else "error"), 0.0, 0)
    return failure(manager, status, message, kind, headers)


def failure(manager, status: int, message: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    current = manager.info
    sglang = {"success": False, "message": message, "version": current and current.version, "source_level": None,
              "seconds": None, "bytes": None}
    return error(status, message, kind, sglang, headers)


@router.post(UPDATE_PATH, dependencies=[Depends(admin)])
def update_weights(body: UpdateRequest, request: Request) -> JSONResponse:
    manager = request.app.state.manager
    try:
        info = manager.update(body.version, body.snapshot_root, body.rank, body.verify)
    except UpdateError as exc:  # the manager counted it under its outcome
        return failure(manager, STATUS.get(type(exc), 500), str(exc))
    return success(f"serving {info.version} from level {info.level} ({info.source}, {info.path})", info)


def success(message: str, info: WeightInfo, **extra) -> JSONResponse:
    return JSONResponse({"success": True, "message": message, "version": info.version, "source_level": info.level,
                         "seconds": info.seconds, "bytes": info.bytes, "load_path": info.path, "digest": info.digest}
                        | extra)


@router.post(PREPARE_PATH, dependencies=[Depends(admin)])
def prepare_weights(body: PrepareRequest, request: Request) -> JSONResponse:
    """Makes a version ready without serving it. ``held``: ``spare`` (double_buffer: loaded and proven, so the
    commit is a pointer flip) or ``checked`` (in_place: checked without writing; the commit loads it)."""
    manager = request.app.state.manager
    try:
        prepared = manager.prepare(body.version, body.snapshot_root, body.rank, body.verify, body.ttl_s)
    except UpdateError as exc:
        return failure(manager, STATUS.get(type(exc), 500), str(exc))
    held = "spare" if prepared.slot else "checked"
    what = "loaded into the spare copy" if prepared.slot else "checked (in_place: loaded at the commit)"
    return success(f"{prepared.info.version} {what}; still serving {manager.info.version if manager.info else None}",
                   prepared.info, held=held, expires_in_s=body.ttl_s,
                   serving=manager.info.version if manager.info else None)


@router.post(COMMIT_PATH, dependencies=[Depends(admin)])
def commit_weights(body: VersionRequest, request: Request) -> JSONResponse:
    manager = request.app.state.manager
    if not body.version:
        return failure(manager, 400, "version: name the prepared version to commit")
    try:
        info = manager.commit(body.version)
    except UpdateError as exc:
        return failure(manager, STATUS.get(type(exc), 500), str(exc))
    return success(f"serving {info.version}", info)


@router.post(ABORT_PATH, dependencies=[Depends(admin)])
def abort_weights(body: VersionRequest, request: Request) -> JSONResponse:
    manager = request.app.state.manager
    dropped = manager.abort(body.version)
    serving = manager.info.version if manager.info else None
    return JSONResponse({"success": True, "aborted": dropped.info.version if dropped else None, "version": serving,
                         "message": f"dropped prepared {dropped.info.version}" if dropped else "nothing was prepared"})
