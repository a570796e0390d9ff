"""``POST /v1/completions``: OpenAI's completions over the engine, with ``n`` samples, ``logprobs``, ``echo``
scoring, streaming, and the weight version that produced the reply."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field, ValidationInfo, field_validator

from infer.events import Event, Finished, Logprob, Scored, Token
from infer.routes.common import ErrorReply
from infer.routes.generation import Reply, SamplingFields, asks_for_nothing, run
from infer.sampling import MAX_LOGPROBS
from infer.tokenizer import Tokenizer

router = APIRouter()
PATH = "/v1/completions"


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    _suffix = field_validator("suffix")(asks_for_nothing)

    @field_validator("best_of")
    @classmethod
    def _best_of_n(cls, value: int | None, info: ValidationInfo):
        if value is not None and value != info.data.get("n"):
            raise ValueError(f"{value} is not supported by this server: it returns every one of its n samples "
                             "(leave best_of unset, or equal to n)")
        return value


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

    def token(self, event: Token, tokenizer: Tokenizer) -> dict | None:
        part = None
        if self.logprobs is not None:
            part = _logprobs(tokenizer, [event.token], [event.logprob], [self.base + event.offset])
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


def _logprobs(tokenizer: Tokenizer, tokens: list[int], infos: list[Logprob | None], offsets: list[int]) -> dict:
    """OpenAI's completion logprobs for these tokens: the sampled token's, and the top k (plus the sampled one)."""
    name = tokenizer.token_str
    top = []
    for token, info in zip(tokens, infos):
        if info is None:
            top.append(None)
            continue
        entry = {name(t): lp for t, lp in info.top}
        entry.setdefault(name(token), info.logprob)
        top.append(entry)
    return {"tokens": [name(t) for t in tokens], "token_logprobs": [i and i.logprob for i in infos],
            "top_logprobs": top, "text_offset": offsets}


class CompletionReply(Reply):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, prompt_tokens: int, choices: int, n: int, logprobs: bool, tokenizer: Tokenizer):
        super().__init__(prompt_tokens)
        self.n, self.tokenizer = n, tokenizer
        self.choices = [Choice(i, logprobs) for i in range(choices)]

    def body(self) -> dict:
        return {"choices": [c.to_json() for c in self.choices], "usage": self.usage.to_json()}

    def apply(self, event: Event) -> list[dict]:
        if isinstance(event, Scored):
            return self._echo(event)
        if isinstance(event, Token):
            self.usage.completion += 1
            c = self.choices[event.choice]
            part = c.token(event, self.tokenizer)
            return [{"index": c.index, "text": event.text, "logprobs": part, "finish_reason": None,
                     "token_ids": [event.token]}]
        if isinstance(event, Finished):
            c = self.choices[event.choice]
            c.finish(event)
            return [{"index": c.index, "text": event.text, "logprobs": None, "finish_reason": event.reason}]
        return []

    def _echo(self, event: Scored) -> list[dict]:
        """The prompt's text (and its scores) at the start of each of its choices."""
        tokens, stream, text, offsets = list(event.tokens), self.tokenizer.stream(), "", []
        for token in tokens:
            offsets.append(len(text))
            text += stream.push(token)
        text += stream.close()
        part = None
        if self.choices[0].logprobs is not None:
            part = _logprobs(self.tokenizer, tokens, list(event.logprobs) or [None] * len(tokens), offsets)
        out = []
        for c in self.choices[event.prompt * self.n : (event.prompt + 1) * self.n]:
            c.echo(text, tokens, part)
            out.append({"index": c.index, "text": text, "logprobs": part, "finish_reason": None, "token_ids": tokens})
        return out


@router.post(PATH)
async def completions(body: CompletionRequest, request: Request) -> Response:
    tokenizer: Tokenizer = request.app.state.tokenizer
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts or any(not p for p in prompts):
        raise ErrorReply(400, "prompt must be a non-empty string or list of non-empty strings")
    try:
        ids = [tokenizer.encode(p) for p in prompts]  # with the special tokens the tokenizer adds (BOS)
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") is valid JSON but not text
        raise ErrorReply(400, f"prompt is not valid Unicode text: {exc.reason}") from None
    params = body.params(body.max_tokens, body.logprobs, body.echo)
    reply = CompletionReply(sum(map(len, ids)), len(ids) * body.n, body.n, body.logprobs is not None, tokenizer)
    return await run(request, ids, params, reply, body.stream, body.model,
                     body.weight_version)
