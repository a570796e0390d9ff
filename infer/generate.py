"""Token generation with the KV cache: greedy, or temperature/top-p sampling that a seed makes reproducible.

Sampling draws from a per-request numpy generator, never a process-wide RNG, so concurrent requests with the
same seed get the same tokens whatever else the server is doing.
"""

from __future__ import annotations

from collections.abc import Iterator
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


def stream(model: Decoder, prompt: list[int], params: SamplingParams) -> Iterator[int]:
    """Yields generated token ids; stops at EOS (not yielded), ``max_tokens`` or the context limit."""
    if not prompt:
        raise ValueError("the prompt is empty")
    budget = min(params.max_tokens, model.config.max_seq_len - len(prompt))
    if budget < 0:
        raise ValueError(f"prompt of {len(prompt)} tokens exceeds the context of {model.config.max_seq_len}")
    if budget == 0:
        return
    rng = np.random.default_rng(params.seed)
    cache = model.new_cache(max_len=len(prompt) + budget)
    logits = model(paddle.to_tensor([prompt], dtype="int64"), cache)[0, -1].numpy()
    for i in range(budget):
        token = sample(logits, params, rng)
        if token == EOS:
            return
        yield token
        if i + 1 < budget:
            logits = model(paddle.to_tensor([[token]], dtype="int64"), cache)[0, -1].numpy()


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def complete(model: Decoder, prompt: list[int], params: SamplingParams) -> Completion:
    """Generates to the end, cutting the text before the first stop string (OpenAI's convention)."""
    tokens: list[int] = []
    for token in stream(model, prompt, params):
        tokens.append(token)
        text = to_bytes(tokens).decode("utf-8", errors="replace")
        hits = [text.find(s) for s in params.stop if s and s in text]
        if hits:
            return Completion(tokens, text[: min(hits)], "stop")
    text = to_bytes(tokens).decode("utf-8", errors="replace")
    budget = min(params.max_tokens, model.config.max_seq_len - len(prompt))
    return Completion(tokens, text, "stop" if len(tokens) < budget else "length")
