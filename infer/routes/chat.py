"""``POST /v1/chat/completions``: OpenAI's chat completions. The conversation is rendered by the tokenizer's chat
template with the generation prompt (as ``transformers``' ``apply_chat_template`` renders it), encoded without
adding special tokens again (the template writes them), and run through the same engine as completions. Each
choice's ``message`` carries ``token_ids``, the reply ``prompt_token_ids`` (the rendered prompt an RL trainer
scores) and ``weight_version``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from infer.events import Event, Finished, Logprob, Token
from infer.routes.common import ErrorReply
from infer.routes.generation import Reply, SamplingFields, run
from infer.sampling import MAX_LOGPROBS
from infer.tokenizer import ChatTemplateError, Tokenizer

router = APIRouter()
PATH = "/v1/chat/completions"
TEMPLATE_VARIABLES = ("messages", "tools", "documents", "add_generation_prompt")  # set by the server


class Message(BaseModel):
    """One message; fields besides ``role`` and ``content`` (``name``, ``tool_calls``, ``tool_call_id``,
    ``reasoning_content``...) go to the template as they are."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value):
        """Text parts (``[{"type": "text", "text": ...}]``) are joined by newlines, as vLLM joins them."""
        if not isinstance(value, list):
            return value
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in value):
            raise ValueError("only text content is supported: a string, or parts {'type': 'text', 'text': ...}")
        return "\n".join(part["text"] for part in value)


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None  # rendered by the template; tool calls come back as the raw text
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extension: more template variables


class ChatChoice:
    def __init__(self, index: int, logprobs: bool):
        self.index, self.content, self.token_ids, self.finish_reason = index, "", [], None
        self.logprobs = {"content": [], "refusal": None} if logprobs else None

    def to_json(self) -> dict:
        return {"index": self.index, "message": {"role": "assistant", "content": self.content,
                                                 "token_ids": self.token_ids},
                "logprobs": self.logprobs, "finish_reason": self.finish_reason}


class ChatReply(Reply):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def __init__(self, prompt: list[int], n: int, logprobs: bool, tokenizer: Tokenizer):
        super().__init__(len(prompt))
        self.prompt, self.tokenizer = prompt, tokenizer
        self.choices = [ChatChoice(i, logprobs) for i in range(n)]

    def body(self) -> dict:
        return {"choices": [c.to_json() for c in self.choices], "usage": self.usage.to_json(),
                "prompt_token_ids": self.prompt}

    def opening(self) -> list[dict]:
        return [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for c in self.choices]

    def apply(self, event: Event) -> list[dict]:
        if isinstance(event, Token):
            self.usage.completion += 1
            c = self.choices[event.choice]
            c.content += event.text
            c.token_ids.append(event.token)
            part = None
            if c.logprobs is not None:
                part = {"content": [self._logprob(event.token, event.logprob)], "refusal": None}
                c.logprobs["content"] += part["content"]
            return [{"index": c.index, "delta": {"content": event.text, "token_ids": [event.token]},
                     "logprobs": part, "finish_reason": None}]
        if isinstance(event, Finished):
            c = self.choices[event.choice]
            c.content += event.text
            c.finish_reason = event.reason
            return [{"index": c.index, "delta": {"content": event.text} if event.text else {}, "logprobs": None,
                     "finish_reason": event.reason}]
        return []

    def _logprob(self, token: int, info: Logprob) -> dict:
        """OpenAI's chat logprob of a token: its name, raw log-probability and bytes, and the k most likely."""
        def named(t: int, logprob: float) -> dict:
            return {"token": self.tokenizer.token_str(t), "logprob": logprob,
                    "bytes": list(self.tokenizer.token_bytes(t))}

        return named(token, info.logprob) | {"top_logprobs": [named(t, lp) for t, lp in info.top]}


@router.post(PATH)
async def chat(body: ChatRequest, request: Request) -> Response:
    tokenizer: Tokenizer = request.app.state.tokenizer
    if body.top_logprobs is not None and not body.logprobs:
        raise ErrorReply(400, "top_logprobs: set logprobs to true to ask for top_logprobs")
    extra = body.chat_template_kwargs or {}
    if clash := [k for k in TEMPLATE_VARIABLES if k in extra]:
        raise ErrorReply(400, f"chat_template_kwargs: {', '.join(clash)} is set by the server, not by the request")
    try:
        text = tokenizer.render_chat([m.model_dump() for m in body.messages], add_generation_prompt=True,
                                     tools=body.tools, **extra)
        ids = tokenizer.encode(text, add_special_tokens=False)  # the template wrote them
    except ChatTemplateError as exc:
        raise ErrorReply(400, str(exc)) from None
    except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800") is valid JSON but not text
        raise ErrorReply(400, f"messages are not valid Unicode text: {exc.reason}") from None
    params = body.params(_max_tokens(body, len(ids), request.app.state.engine.config.max_seq_len),
                         (body.top_logprobs or 0) if body.logprobs else None)
    return await run(request, [ids], params, ChatReply(ids, body.n, body.logprobs, tokenizer), body.stream,
                     body.model, body.weight_version)


def _max_tokens(body: ChatRequest, prompt: int, limit: int) -> int:
    """``max_completion_tokens`` or ``max_tokens`` (the same when both are given); without either, the rest of
    the context (at least one token, so a prompt that fills the context is refused as too long)."""
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise ErrorReply(400, f"max_tokens ({body.max_tokens}) and max_completion_tokens "
                           f"({body.max_completion_tokens}) differ: send one of them")
    chosen = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return chosen if chosen is not None else max(limit - prompt, 1)
