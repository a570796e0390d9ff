"""``GET /v1/weights`` (what is served) and ``POST /v1/update_weights`` (load a version and swap it in). An update
answers SGLang's ``{success, message, version, ...}``; a failed one adds OpenAI's ``error`` object."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

import kernels
from infer.routes.common import ErrorReply, error
from infer.weights import RestoreFailed, SnapshotRejected, StorageUnavailable, UpdateBusy, UpdateError

router = APIRouter()

UPDATE_PATH = "/v1/update_weights"
STATUS = {UpdateBusy: 409, SnapshotRejected: 400, StorageUnavailable: 503, RestoreFailed: 500}
REFUSED = {401: "unauthorized", 403: "forbidden"}  # baton_weight_updates outcomes of updates refused at the door


class UpdateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str
    snapshot_root: str | None = None
    rank: int | None = None
    verify: str | None = None


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
    return described | {"mode": manager.mode, "tp_size": manager.tp_size, "model": request.app.state.model_name,
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
    return JSONResponse({"success": True, "message": f"serving {info.version} from level {info.level} ({info.source}, "
                                                     f"{info.path})",
                         "version": info.version, "source_level": info.level, "seconds": info.seconds,
                         "bytes": info.bytes, "load_path": info.path, "digest": info.digest})
