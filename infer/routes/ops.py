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
    """OpenAI's model list: the one served model (and vLLM's ``max_model_len``, its context)."""
    state = request.app.state
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                        "owned_by": "baton", "max_model_len": state.engine.config.max_seq_len}]}
