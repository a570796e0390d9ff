"""``POST /v1/completions``: OpenAI's completions over the engine, with ``n`` samples, ``logprobs``, ``echo``
scoring, streaming, and the weight version that produced the reply."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from infer.events import Event, Failed, Finished, Logprob, Scored, Token
from infer.routes.common import Refused, kind_of
from infer.sampling import MAX_LOGPROBS, MAX_N, SamplingParams, TextStream
from infer.tokenizer import encode, to_bytes, token_str

router = APIRouter()
PATH = "/v1/completions"
VERSION_HEADER = "X-Weight-Version"
DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400 that names it, as OpenAI answers

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=MAX_N)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says
    # OpenAI fields a client library may send at their defaults: accepted while they ask for nothing more
    user: str | None = None
    suffix: str | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    stream_options: dict[str, bool] | None = None

    @field_validator("suffix", "presence_penalty", "frequency_penalty", "logit_bias", "stream_options")
    @classmethod
    def _asks_for_nothing(cls, value, info: ValidationInfo):
        """Unset, zero, empty, or a dict of such (``{"include_usage": false}``); anything else is not done here."""
        if value and not (isinstance(value, dict) and not any(value.values())):
            raise ValueError(f"{value!r} is not supported by this server (leave {info.field_name} unset)")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_n(cls, value: int | None, info: ValidationInfo):
        if value is not None and value != info.data.get("n"):
            raise ValueError(f"{value} is not supported by this server: it returns every one of its n samples "
                             "(leave best_of unset, or equal to n)")
        return value


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
        while True:
            if request is not None and time.monotonic() >= self._check_at:
                self._check_at = time.monotonic() + DISCONNECT_POLL
                if await request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL)
            except TimeoutError:
                continue


class Choice:
    """One choice of the reply, built from its events."""

    def __init__(self, index: int, logprobs: bool):
        self.index, self.text, self.token_ids, self.finish_reason = index, "", [], None
        self.base = 0  # characters of echoed prompt before the completion's text
        self.logprobs = ({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
                         if logprobs else None)

    def echo(self, text: str, tokens: list[int], part: dict | None) -> None:
        self._add(text, tokens, part)
        self.base = len(self.text)

    def token(self, event: Token) -> dict | None:
        part = None
        if self.logprobs is not None:
            part = _logprobs([event.token], [event.logprob], [self.base + event.offset])
        self._add(event.text, [event.token], part)
        return part

    def finish(self, event: Finished) -> None:
        self.text += event.text
        self.finish_reason = event.reason

    def _add(self, text: str, tokens: list[int], part: dict | None) -> None:
        self.text += text
        self.token_ids += tokens
        if part is not None:
            for key, values in part.items():
                self.logprobs[key] += values

    def to_json(self) -> dict:
        return {"index": self.index, "text": self.text, "logprobs": self.logprobs, "finish_reason": self.finish_reason,
                "token_ids": self.token_ids}


def _logprobs(tokens: list[int], infos: list[Logprob | None], offsets: list[int]) -> dict:
    """OpenAI's completion logprobs for these tokens: the sampled token's, and the top k (plus the sampled one)."""
    top = []
    for token, info in zip(tokens, infos):
        if info is None:
            top.append(None)
            continue
        entry = {token_str(t): lp for t, lp in info.top}
        entry.setdefault(token_str(token), info.logprob)
        top.append(entry)
    return {"tokens": [token_str(t) for t in tokens], "token_logprobs": [i and i.logprob for i in infos],
            "top_logprobs": top, "text_offset": offsets}


@router.post(PATH)
async def completions(body: CompletionRequest, request: Request) -> Response:
    app = request.app.state
    metrics = app.manager.metrics
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or any(not p for p in prompts):
        raise Refused(400, "prompt must be a non-empty string or list of non-empty strings")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        ids = [encode(p) for p in prompts]
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") is valid JSON but not text
        raise Refused(400, f"prompt is not valid Unicode text: {exc.reason}") from None
    _check_context(ids, body.max_tokens, app.engine.config.max_seq_len)
    channel = Channel()
    try:
        params = SamplingParams(body.max_tokens, body.temperature, body.top_p, body.seed, stop, body.n, body.logprobs,
                                body.echo, body.ignore_eos)
        job = app.engine.submit(ids, params, channel)
    except ValueError as exc:
        raise Refused(400, str(exc)) from None
    first = await channel.next(None if body.stream else request)  # a stream learns of a disconnect from Starlette
    if (refusal := _refusal(first, app.engine, job, metrics)) is not None:
        return refusal
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model or app.model_name, "weight_version": first.version}
    headers = {VERSION_HEADER: first.version}
    choices = [Choice(i, body.logprobs is not None) for i in range(len(ids) * body.n)]
    usage = Usage(sum(map(len, ids)))
    if body.stream:
        return StreamingResponse(_sse(head, choices, body.n, channel, request, job, usage, metrics),
                                 media_type="text/event-stream", headers=headers)
    while any(c.finish_reason is None for c in choices):
        event = await channel.next(request)
        if (refusal := _refusal(event, app.engine, job, metrics)) is not None:
            return refusal
        _apply(event, choices, body.n, usage)
    metrics.completion(200, usage.prompt, usage.completion)
    return JSONResponse(head | {"choices": [c.to_json() for c in choices], "usage": usage.to_json()}, headers=headers)


def _check_context(ids: list[list[int]], max_tokens: int, limit: int) -> None:
    """Every prompt plus ``max_tokens`` must fit the model's context: vLLM's and OpenAI's 400, before any work."""
    for i, prompt in enumerate(ids):
        if len(prompt) + max_tokens > limit:
            which = f" (prompt {i})" if len(ids) > 1 else ""
            raise Refused(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                               f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt{which}, {max_tokens} "
                               f"in max_tokens). Please reduce max_tokens or the prompt.")


def _refusal(event: Event | None, engine, job, metrics) -> Response | None:
    """The reply of a request that ends without a result: its client left (499) or the engine failed it (raised
    as ``Refused``, which the app answers and counts)."""
    if event is None:
        engine.abort(job)
        metrics.completion(499)
        return Response(status_code=499)
    if isinstance(event, Failed):
        raise Refused(event.status, event.message)
    return None


class Usage:
    def __init__(self, prompt: int):
        self.prompt, self.completion = prompt, 0

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                "total_tokens": self.prompt + self.completion}


def _apply(event: Event, choices: list[Choice], n: int, usage: Usage) -> list[dict]:
    """Adds an event to the reply; returns the stream chunks' choices it makes."""
    if isinstance(event, Scored):
        tokens, stream, offsets = list(event.tokens), TextStream(to_bytes, ()), []
        for token in tokens:
            offsets.append(stream.offset)
            stream.push(token)
        text = stream.text + stream.close()
        part = None
        if choices[0].logprobs is not None:
            part = _logprobs(tokens, list(event.logprobs) or [None] * len(tokens), offsets)
        out = []
        for c in choices[event.prompt * n : (event.prompt + 1) * n]:
            c.echo(text, tokens, part)
            out.append({"index": c.index, "text": text, "logprobs": part, "finish_reason": None, "token_ids": tokens})
        return out
    if isinstance(event, Token):
        usage.completion += 1
        c = choices[event.choice]
        part = c.token(event)
        return [{"index": c.index, "text": event.text, "logprobs": part, "finish_reason": None,
                 "token_ids": [event.token]}]
    if isinstance(event, Finished):
        c = choices[event.choice]
        c.finish(event)
        return [{"index": c.index, "text": event.text, "logprobs": None, "finish_reason": event.reason}]
    return []


async def _sse(head: dict, choices: list[Choice], n: int, channel: Channel, request: Request, job, usage: Usage,
               metrics) -> AsyncIterator[str]:
    """Server-sent events, one per token (and per end of a choice), then ``[DONE]``. A client that goes away
    ends its request in the engine at the next step (counted as status 499)."""
    status = 499
    try:
        while any(c.finish_reason is None for c in choices):
            event = await channel.next(None)  # Starlette cancels this generator when the client goes away
            if isinstance(event, Failed):
                status = event.status
                failure = {"message": event.message, "type": kind_of(event.status), "code": event.status}
                yield f"data: {json.dumps({'error': failure})}\n\n"
                return
            for chunk in _apply(event, choices, n, usage):
                yield f"data: {json.dumps(head | {'choices': [chunk]})}\n\n"
        status = 200
        metrics.completion(200, usage.prompt, usage.completion)
        yield "data: [DONE]\n\n"
    finally:
        if status != 200:
            metrics.completion(status)
            request.app.state.engine.abort(job)
