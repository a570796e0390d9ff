"""Health, Prometheus metrics and the model list."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter()


@router.get("/health")
def health(request: Request) -> Response:
    return Response(status_code=200 if request.app.state.manager.healthy else 503)


@router.get("/metrics")
def prometheus(request: Request) -> Response:
    return Response(request.app.state.manager.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
def models(request: Request) -> dict:
    name = request.app.state.model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "baton"}]}
