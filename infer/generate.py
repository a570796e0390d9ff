"""Token generation with the KV cache: greedy, or temperature/top-p sampling that a seed makes reproducible.

Sampling draws from a per-request numpy generator, never a process-wide RNG, so concurrent requests with the
same seed get the same tokens whatever else the server is doing.
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Iterator
from typing import ContextManager
from dataclasses import dataclass, field

import numpy as np
import paddle

from infer.model import Decoder
from infer.tokenizer import EOS, to_bytes


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from float32 ``logits`` [vocab]."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if params.top_p < 1:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), params.top_p)) + 1]
        kept = np.zeros_like(p)
        kept[keep] = p[keep]
        p = kept / kept.sum()
    return int(rng.choice(p.size, p=p))


def stream(model: Decoder, prompt: list[int], params: SamplingParams,
           lock: ContextManager | None = None) -> Iterator[int]:
    """Yields generated token ids; stops at EOS (not yielded), ``max_tokens`` or the context limit."""
    if not prompt:
        raise ValueError("the prompt is empty")
    budget = min(params.max_tokens, model.config.max_seq_len - len(prompt))
    if budget < 0:
        raise ValueError(f"prompt of {len(prompt)} tokens exceeds the context of {model.config.max_seq_len}")
    if budget == 0:
        return
    rng = np.random.default_rng(params.seed)
    lock = lock or contextlib.nullcontext()
    with lock, paddle.no_grad():
        cache = model.new_cache(max_len=len(prompt) + budget)
        logits = model(paddle.to_tensor([prompt], dtype="int64"), cache)[0, -1].numpy()
    for i in range(budget):
        token = sample(logits, params, rng)
        if token == EOS:
            return
        yield token
        if i + 1 < budget:
            with lock, paddle.no_grad():
                logits = model(paddle.to_tensor([[token]], dtype="int64"), cache)[0, -1].numpy()


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def pieces(model: Decoder, prompt: list[int], params: SamplingParams, tokens: list[int] | None = None,
           lock: ContextManager | None = None) -> Iterator[tuple[str, str | None]]:
    """Text as it is generated, as ``(text, finish_reason)``; the reason is set on the last piece only.

    Text is cut before the first stop string (OpenAI's convention), so a piece is held back while it could
    still be the start of one; bytes of a split UTF-8 character wait for the rest. Generated ids are appended
    to ``tokens`` when given. ``lock`` is held around each forward step (the server serialises model compute).
    """
    tokens = [] if tokens is None else tokens
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = [s for s in params.stop if s]
    hold = max((len(s) for s in stops), default=1) - 1
    text, sent = "", 0
    for token in stream(model, prompt, params, lock):
        tokens.append(token)
        text += decoder.decode(to_bytes([token]))
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            yield text[sent : min(hits)], "stop"
            return
        if len(text) - hold > sent:
            yield text[sent : len(text) - hold], None
            sent = len(text) - hold
    text += decoder.decode(b"", final=True)
    budget = min(params.max_tokens, model.config.max_seq_len - len(prompt))
    yield text[sent:], "stop" if len(tokens) < budget else "length"


def complete(model: Decoder, prompt: list[int], params: SamplingParams) -> Completion:
    """Generates to the end; the same text the streamed pieces add up to."""
    tokens: list[int] = []
    parts = list(pieces(model, prompt, params, tokens))
    return Completion(tokens, "".join(p for p, _ in parts), parts[-1][1])
