"""``GET /v1/weights`` (what is served) and ``POST /v1/update_weights`` (load a version and swap it in)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from infer.routes.common import Refused
from infer.weights import RestoreFailed, SnapshotRejected, StorageUnavailable, UpdateBusy, UpdateError

router = APIRouter()

STATUS = {UpdateBusy: 409, SnapshotRejected: 400, StorageUnavailable: 503, RestoreFailed: 500}


class UpdateRequest(BaseModel):
    version: str
    snapshot_root: str | None = None
    rank: int | None = None
    verify: str | None = None


def admin(request: Request, authorization: str | None = Header(None)) -> None:
    token = request.app.state.admin_token
    if token is None:
        return
    if not authorization or not authorization.startswith("Bearer "):
        raise Refused(401, "this server needs an admin token: send 'Authorization: Bearer <token>'",
                      "authentication_error")
    if not hmac.compare_digest(authorization[7:].encode(), token.encode()):
        raise Refused(403, "the admin token is wrong", "authentication_error")


@router.get("/v1/weights")
def weights(request: Request) -> dict:
    manager = request.app.state.manager
    info = manager.info
    described = info.to_json() if info else {k: None for k in ("version", "snapshot_root", "rank", "source_level",
                                                                "source", "loaded_at", "bytes", "seconds", "digest")}
    return described | {"mode": manager.mode, "tp_size": manager.tp_size, "model": request.app.state.model_name,
                        "healthy": manager.healthy, "problem": manager.broken, "updating": manager.updating}


@router.post("/v1/update_weights", dependencies=[Depends(admin)])
def update_weights(body: UpdateRequest, request: Request) -> JSONResponse:
    manager = request.app.state.manager
    try:
        info = manager.update(body.version, body.snapshot_root, body.rank, body.verify)
    except UpdateError as exc:
        current = manager.info
        return JSONResponse({"success": False, "message": str(exc), "version": current and current.version,
                             "source_level": None, "seconds": None, "bytes": None},
                            status_code=STATUS.get(type(exc), 500))
    return JSONResponse({"success": True, "message": f"serving {info.version} from level {info.level} ({info.source})",
                         "version": info.version, "source_level": info.level, "seconds": info.seconds,
                         "bytes": info.bytes})
