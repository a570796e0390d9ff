"""The HTTP face of a server: OpenAI-shaped completions from the engine, each stamped with the weight version that
produced it, and the weight-update routes (SGLang's reply convention). Errors use OpenAI's error body."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from infer.engine import Engine
from infer.routes import completions, ops, weights
from infer.routes.common import Refused, error
from infer.weights import WeightManager


def create_app(manager: WeightManager, engine: Engine, model_name: str, admin_token: str | None = None) -> FastAPI:
    app = FastAPI(title="Baton inference server")
    app.state.manager, app.state.engine, app.state.model_name = manager, engine, model_name
    app.state.admin_token = admin_token

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
        if request.url.path == "/v1/completions":
            manager.metrics.completion(400)
        return error(400, problems or "invalid request")

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return error(exc.status, str(exc), exc.kind)

    for module in (completions, weights, ops):
        app.include_router(module.router)
    return app
