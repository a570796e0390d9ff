"""What a request asks for (``SamplingParams``), how one token is drawn, and how tokens become text.

Every sample draws from its own numpy generator seeded by ``(seed, sample index)``, never a process-wide RNG:
sample i of a request is the same whether the request asks for 4 samples or 8, runs alone or among 63 others.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np

MAX_N = 64
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    n: int = 1
    logprobs: int | None = None  # top-k alternatives per token (0: only the sampled token's); None: no logprobs
    echo: bool = False  # also score (and return) the prompt
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks)

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in 1..{MAX_N}, got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{MAX_LOGPROBS}, got {self.logprobs}")

    def with_seed(self) -> SamplingParams:
        """These params with a seed drawn now when none was given, so all samples of a request share one."""
        if self.seed is not None:
            return self
        return SamplingParams(**{**self.__dict__, "seed": secrets.randbits(63)})


def rng_for(seed: int, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of a request seeded ``seed``."""
    return np.random.default_rng([seed, index])


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


class TextStream:
    """Text of one sample as its tokens arrive, from the tokenizer's detokeniser (``Tokenizer.stream()``, which
    holds back a UTF-8 character split over tokens until its last one). A piece is also held back while it could
    still be the start of a stop string; text ends before the first stop string (OpenAI's convention)."""

    def __init__(self, detokenizer, stop: tuple[str, ...]):
        self._detokenizer = detokenizer
        self._stops = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.text, self.sent = "", 0
        self.stopped = False

    @property
    def offset(self) -> int:
        """Characters decoded so far: where the next token's text starts."""
        return len(self.text)

    def push(self, token: int) -> str:
        """The text this token releases; sets ``stopped`` when a stop string is complete."""
        self.text += self._detokenizer.push(token)
        hits = [self.text.find(s) for s in self._stops if s in self.text]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self._release(len(self.text))
        return self._release(len(self.text) - self._hold)

    def close(self) -> str:
        """Whatever was held back, at the end of the sample."""
        if not self.stopped:
            self.text += self._detokenizer.close()
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : upto], upto
        return piece
