"""What ``/v1/completions`` and ``/v1/chat/completions`` share: the OpenAI sampling fields, a request run in the
engine (its events brought into the request's event loop, its client's disconnect, its refusals), and the reply,
whole or as server-sent events, stamped with the weight version that produced it (``weight_version`` in the body
and in every chunk, header ``X-Weight-Version``). A route only says how events become its reply (``Reply``)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from infer.events import Event, Failed
from infer.routes.common import ErrorReply, kind_of
from infer.sampling import MAX_N, SamplingParams

VERSION_HEADER = "X-Weight-Version"
DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there


def asks_for_nothing(value, info: ValidationInfo):
    """Unset, zero, empty, or a dict of such (``{"include_usage": false}``); anything else is not done here."""
    if value and not (isinstance(value, dict) and not any(value.values())):
        raise ValueError(f"{value!r} is not supported by this server (leave {info.field_name} unset)")
    return value


class SamplingFields(BaseModel):
    """The fields both routes take. An unknown field is a 400 that names it, as OpenAI answers; OpenAI fields a
    client library may send at their defaults are accepted while they ask for nothing more."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream_options: dict[str, bool] | None = None
    # Baton's: answer only from this weight version (the name replies carry), else 409. An RL rollout pins the
    # policy it samples from; OpenAI clients send it in ``extra_body``.
    weight_version: str | None = Field(None, min_length=1, max_length=256)

    _nothing = field_validator("presence_penalty", "frequency_penalty", "logit_bias", "stream_options")(
        asks_for_nothing)

    def params(self, max_tokens: int, logprobs: int | None, echo: bool = False) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        try:
            return SamplingParams(max_tokens, self.temperature, self.top_p, self.seed, stop, self.n, logprobs, echo,
                                  self.ignore_eos)
        except ValueError as exc:
            raise ErrorReply(400, str(exc)) from None


class Channel:
    """Events from the engine's thread into this request's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self._check_at = 0.0

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self, request: Request | None) -> Event | None:
        """The next event, or None once the client has gone away (checked every ``DISCONNECT_POLL`` seconds, also
        while events keep coming). Without a ``request`` it never checks: a streamed reply is cancelled by
        Starlette when its client goes away."""
        if request is None:
            return await self.queue.get()  # no timeout to arm: wait_for costs a task per token
        while True:
            if time.monotonic() >= self._check_at:
                self._check_at = time.monotonic() + DISCONNECT_POLL
                if await request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL)
            except TimeoutError:
                continue


class Usage:
    def __init__(self, prompt: int):
        self.prompt, self.completion = prompt, 0

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}


class Reply:
    """How a route's reply is built from the engine's events; one per request."""

    object = chunk_object = id_prefix = ""  # the reply's "object", a streamed chunk's, and the id's prefix
    choices: list  # each with a ``finish_reason``, None until it ends

    def __init__(self, prompt_tokens: int):
        self.usage = Usage(prompt_tokens)

    def opening(self) -> list[dict]:
        """Chunk choices streamed before any token (chat's assistant role)."""
        return []

    def apply(self, event: Event) -> list[dict]:
        """Adds an event to the reply; returns the streamed chunks' choices it makes."""
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def body(self) -> dict:
        """The whole reply's fields after the common head (``choices``, ``usage``, ...)."""
        raise NotImplementedError


def check_prompts(ids: list[list[int]], max_tokens: int, config) -> None:
    """Every prompt plus ``max_tokens`` must fit the model's context (vLLM's and OpenAI's 400, before any work),
    and every token must be in the model's vocabulary (a tokenizer that does not match the model)."""
    limit = config.max_seq_len
    for i, prompt in enumerate(ids):
        which = f" (prompt {i})" if len(ids) > 1 else ""
        if len(prompt) + max_tokens > limit:
            raise ErrorReply(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                               f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt{which}, {max_tokens} "
                               f"in max_tokens). Please reduce max_tokens or the prompt.")
        if prompt and max(prompt) >= config.vocab_size:
            raise ErrorReply(400, f"token {max(prompt)} of the prompt{which} is outside the model's vocabulary of "
                               f"{config.vocab_size}: the server's tokenizer does not match its model")


async def run(request: Request, ids: list[list[int]], params: SamplingParams, reply: Reply, stream: bool,
              model: str | None, weight_version: str | None = None) -> Response:
    """Runs the request in the engine and answers with ``reply``'s body, or its chunks as server-sent events;
    with ``weight_version``, only from a model copy holding that version (409 when none does)."""
    app = request.app.state
    metrics = app.manager.metrics
    check_prompts(ids, params.max_tokens, app.engine.config)
    channel = Channel()
    try:
        job = app.engine.submit(ids, params, channel, version=weight_version)
    except ValueError as exc:
        raise ErrorReply(400, str(exc)) from None
    first = await channel.next(None if stream else request)  # a stream learns of a disconnect from Starlette
    if (refusal := _refusal(first, app.engine, job, metrics)) is not None:
        return refusal
    head = {"id": f"{reply.id_prefix}-{uuid.uuid4().hex}", "object": reply.object, "created": int(time.time()),
            "model": model or app.model_name, "weight_version": first.version}
    headers = {VERSION_HEADER: first.version}
    if stream:
        return StreamingResponse(_sse(head | {"object": reply.chunk_object}, reply, channel, request, job, metrics),
                                 media_type="text/event-stream", headers=headers)
    while not reply.finished:
        event = await channel.next(request)
        if (refusal := _refusal(event, app.engine, job, metrics)) is not None:
            return refusal
        reply.apply(event)
    metrics.completion(200, reply.usage.prompt, reply.usage.completion)
    return JSONResponse(head | reply.body(), headers=headers)


# The engine says why a request failed; the HTTP status is chosen here, at the edge.
FAILURE_STATUS = {"no_weights": 503, "version_unavailable": 409, "engine_error": 500}


def _refusal(event: Event | None, engine, job, metrics) -> Response | None:
    """The reply of a request that ends without a result: its client left (499) or the engine failed it (raised
    as ``ErrorReply``, which the app answers and counts)."""
    if event is None:
        engine.abort(job)
        metrics.completion(499)
        return Response(status_code=499)
    if isinstance(event, Failed):
        raise ErrorReply(FAILURE_STATUS[event.reason], event.message)
    return None


async def _sse(head: dict, reply: Reply, channel: Channel, request: Request, job, metrics) -> AsyncIterator[str]:
    """Server-sent events, one per token (and per end of a choice), then ``[DONE]``. A client that goes away
    ends its request in the engine at the next step (counted as status 499)."""
    status = 499
    try:
        for choice in reply.opening():
            yield f"data: {json.dumps(head | {'choices': [choice]})}\n\n"
        while not reply.finished:
            event = await channel.next(None)  # Starlette cancels this generator when the client goes away
            if isinstance(event, Failed):
                status = FAILURE_STATUS[event.reason]
                failure = {"message": event.message, "type": kind_of(status), "code": status}
                yield f"data: {json.dumps({'error': failure})}\n\n"
                return
            for choice in reply.apply(event):
                yield f"data: {json.dumps(head | {'choices': [choice]})}\n\n"
        status = 200
        metrics.completion(200, reply.usage.prompt, reply.usage.completion)
        yield "data: [DONE]\n\n"
    finally:
        if status != 200:
            metrics.completion(status)
            request.app.state.engine.abort(job)
