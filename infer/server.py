"""The HTTP face of a server: OpenAI-shaped completions and chat completions from the engine, each stamped with the
weight version that produced it, and the weight-update routes (SGLang's reply convention). Every 4xx/5xx carries
OpenAI's error body, ``{"error": {"message", "type", "code"}}``, and is counted in ``/metrics`` by the handlers
below."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from infer.engine import Engine
from infer.routes import chat, completions, ops, weights
from infer.routes.common import ErrorReply, error
from infer.tokenizer import BYTES, Tokenizer
from infer.weights import WeightManager


def create_app(manager: WeightManager, engine: Engine, model_name: str, admin_token: str | None = None,
               tokenizer: Tokenizer | None = None) -> FastAPI:
    """The app over ``engine``. The routes encode prompts and render chat templates with ``tokenizer``, which must
    be the engine's own (the one its samples stop and detokenise with); by default it is (the byte tokenizer
    unless the engine was given another)."""
    tokenizer = tokenizer or getattr(engine, "tokenizer", BYTES)
    if getattr(engine, "tokenizer", tokenizer) is not tokenizer:
        raise ValueError("create_app: the tokenizer must be the engine's own (Engine(..., tokenizer=...))")
    app = FastAPI(title="Baton inference server")
    app.state.manager, app.state.engine, app.state.model_name = manager, engine, model_name
    app.state.admin_token, app.state.tokenizer, app.state.created = admin_token, tokenizer, int(time.time())

    def reply(request: Request, status: int, message: str, kind: str | None = None,
              headers: dict | None = None) -> JSONResponse:
        """The error reply of a request its route did not answer itself, counted under its route's metric."""
        path = request.url.path
        if path == weights.UPDATE_PATH:
            return weights.refused(manager, status, message, kind, headers)
        if path in (completions.PATH, chat.PATH):
            manager.metrics.completion(status)
        return error(status, message, kind, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return reply(request, 400, describe(exc.errors()))

    @app.exception_handler(ErrorReply)
    async def refused(request: Request, exc: ErrorReply) -> JSONResponse:
        return reply(request, exc.status, str(exc), exc.kind)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        message = {404: f"no such route: {where}",
                   405: f"method not allowed: {where} (allowed: {(exc.headers or {}).get('Allow', 'none')})"}
        return reply(request, exc.status_code, message.get(exc.status_code, str(exc.detail)), headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this reply; the client only learns that it happened
        return reply(request, 500, f"the server failed on this request ({type(exc).__name__}); see its log")

    for module in (completions, chat, weights, ops):
        app.include_router(module.router)
    return app


def describe(errors: list[dict]) -> str:
    """Pydantic's validation errors as one message that names each field: OpenAI's wording for unknown fields."""
    problems = []
    for e in errors:
        field = ".".join(map(str, e["loc"][1:]))  # loc[0] is "body", "header" or "query"
        if e["type"] == "extra_forbidden":
            problems.append(f"unknown field '{field}'")
        elif e["type"] == "json_invalid":
            problems.append(f"the body is not valid JSON: {e['ctx']['error']} (at character {field})")
        elif e["type"] in ("model_attributes_type", "missing") and not field:
            problems.append("the body must be a JSON object, sent with 'Content-Type: application/json'")
        else:
            problems.append(f"{field or e['loc'][0]}: {e['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems) or "invalid request"
