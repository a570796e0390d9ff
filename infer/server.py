"""The HTTP face of a server: OpenAI-shaped completions stamped with the weight version that produced them,
and the weight-update routes (SGLang's reply convention)."""

from __future__ import annotations

import contextlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from infer.generate import SamplingParams, pieces
from infer.tokenizer import encode
from infer.weights import NotReady, UpdateError, WeightManager

VERSION_HEADER = "X-Weight-Version"


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    echo: bool = False
    logprobs: int | None = Field(None, le=0)


class UpdateRequest(BaseModel):
    version: str
    snapshot_root: str | None = None
    rank: int | None = None
    verify: str | None = None


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(manager: WeightManager, model_name: str, admin_token: str | None = None) -> FastAPI:
    app = FastAPI(title="Baton inference server")
    metrics = manager.metrics

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in exc.errors())
        return _error(400, problems or "invalid request")

    def admin(authorization: str | None = Header(None)) -> None:
        if admin_token is None:
            return
        if not authorization or not authorization.startswith("Bearer "):
            raise _Refused(401, "this server needs an admin token: send 'Authorization: Bearer <token>'")
        if not hmac.compare_digest(authorization[7:].encode(), admin_token.encode()):
            raise _Refused(403, "the admin token is wrong")

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused) -> JSONResponse:
        return _error(exc.status, str(exc), "authentication_error")

    @app.get("/health")
    def health() -> Response:
        return Response(status_code=200 if manager.healthy else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "baton"}]}

    @app.get("/v1/weights")
    def weights() -> dict:
        info = manager.info
        return {"version": info and info.version, "snapshot_root": info and info.root, "rank": info and info.rank,
                "source_level": info and info.level, "source": info and info.source,
                "loaded_at": info and datetime.fromtimestamp(info.loaded_at, timezone.utc).isoformat(),
                "bytes": info and info.bytes, "seconds": info and info.seconds, "digest": info and info.digest,
                "mode": manager.mode, "tp_size": manager.tp_size, "model": model_name,
                "healthy": manager.healthy, "problem": manager.broken, "updating": manager.updating}

    @app.post("/v1/update_weights", dependencies=[Depends(admin)])
    def update_weights(req: UpdateRequest) -> JSONResponse:
        try:
            info = manager.update(req.version, req.snapshot_root, req.rank, req.verify)
        except UpdateError as exc:
            current = manager.info
            return JSONResponse({"success": False, "message": str(exc), "version": current and current.version,
                                 "source_level": None, "seconds": None, "bytes": None}, status_code=exc.status)
        return JSONResponse({"success": True, "message": f"serving {info.version} from level {info.level} "
                                                         f"({info.source})", "version": info.version,
                             "source_level": info.level, "seconds": info.seconds, "bytes": info.bytes})

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> Response:
        if req.echo:
            return _error(400, "echo is not supported")
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts or any(not p for p in prompts):
            return _error(400, "prompt must be a non-empty string or list of non-empty strings")
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        try:
            params = SamplingParams(req.max_tokens, req.temperature, req.top_p, req.seed, stop)
        except ValueError as exc:
            return _error(400, str(exc))
        borrowed = contextlib.ExitStack()
        try:
            model, info = borrowed.enter_context(manager.use())
        except NotReady as exc:
            metrics.completion(503)
            return _error(503, str(exc), "service_unavailable")
        ids = [encode(p) for p in prompts]
        too_long = [len(i) for i in ids if len(i) >= model.config.max_seq_len]
        if too_long:
            borrowed.close()
            metrics.completion(400)
            return _error(400, f"prompt of {too_long[0]} tokens leaves no room in the context of "
                               f"{model.config.max_seq_len}")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": req.model or model_name, "weight_version": info.version}
        headers = {VERSION_HEADER: info.version}

        def run(i: int, tokens: list[int]) -> Iterator[tuple[str, str | None]]:
            return pieces(model, ids[i], params, tokens, manager.compute_lock)

        if req.stream:
            return StreamingResponse(_sse(head, ids, run, borrowed, metrics), media_type="text/event-stream",
                                     headers=headers)
        with borrowed:
            choices, generated = [], 0
            for i in range(len(ids)):
                tokens: list[int] = []
                parts = list(run(i, tokens))
                generated += len(tokens)
                choices.append({"index": i, "text": "".join(p for p, _ in parts), "logprobs": None,
                                "finish_reason": parts[-1][1], "token_ids": tokens})
        prompt_tokens = sum(map(len, ids))
        metrics.completion(200, prompt_tokens, generated)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                 "total_tokens": prompt_tokens + generated}
        return JSONResponse(head | {"choices": choices, "usage": usage}, headers=headers)

    return app


def _sse(head: dict, ids: list[list[int]], run, borrowed: contextlib.ExitStack, metrics) -> Iterator[str]:
    """Server-sent events, one per text piece, then ``[DONE]``; the model copy is returned when it ends."""
    generated = 0
    with borrowed:
        for i in range(len(ids)):
            tokens: list[int] = []
            for text, reason in run(i, tokens):
                chunk = head | {"choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            generated += len(tokens)
    metrics.completion(200, sum(map(len, ids)), generated)
    yield "data: [DONE]\n\n"


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
