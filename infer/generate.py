"""Offline generation: the engine run in-process on one model, for tests, benchmarks and scripts.

It is the same code path the server runs (``infer.engine``), so an offline completion equals the server's reply
for the same request and weights, token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from infer.engine import Engine, EngineConfig, VersionUnavailable
from infer.events import Event, Failed, Finished, Logprob, Scored, Token
from infer.model import Decoder
from infer.sampling import SamplingParams, sample  # noqa: F401  (re-exported: the public names of generation)
from infer.tokenizer import BYTES, Tokenizer


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" or "abort"
    logprobs: list[Logprob] = field(default_factory=list)
    prompt_logprobs: list[Logprob | None] = field(default_factory=list)


class Fixed:
    """A model source with one copy that never changes (``version`` names it)."""

    def __init__(self, model: Decoder, version: str = "offline"):
        self.slot = SimpleNamespace(model=model, info=SimpleNamespace(version=version))

    @property
    def place(self):
        return self.slot.model.place

    def acquire(self, version: str | None = None):
        if version is not None and version != self.slot.info.version:
            raise VersionUnavailable(f"weight version {version!r} is not held here: it serves "
                                     f"{self.slot.info.version!r}")
        return self.slot

    def release(self, slot) -> None:
        pass


def generate(model: Decoder, prompts: list[list[int]], params: SamplingParams,
             settings: EngineConfig | None = None, tokenizer: Tokenizer = BYTES) -> list[Completion]:
    """Every choice (``len(prompts) * params.n``, in OpenAI's order) of one request, run to the end. By default
    the KV pool holds just this request's sequences, not a server's worth."""
    events: list[Event] = []
    settings = settings or EngineConfig(max_num_seqs=len(prompts) * params.n)
    engine = Engine(Fixed(model), model.config, settings, tokenizer=tokenizer)
    engine.submit(prompts, params, events.append)
    engine.run_until_idle()
    return collect(events, len(prompts) * params.n, params.n)


def collect(events: list[Event], choices: int, n: int) -> list[Completion]:
    out = [Completion([], "", "") for _ in range(choices)]
    for ev in events:
        if isinstance(ev, Failed):
            raise RuntimeError(ev.message)
        if isinstance(ev, Token):
            c = out[ev.choice]
            c.tokens.append(ev.token)
            c.text += ev.text
            if ev.logprob is not None:
                c.logprobs.append(ev.logprob)
        elif isinstance(ev, Finished):
            out[ev.choice].text += ev.text
            out[ev.choice].finish_reason = ev.reason
        elif isinstance(ev, Scored):
            for i in range(n):
                out[ev.prompt * n + i].prompt_logprobs = list(ev.logprobs)
    return out


def complete(model: Decoder, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer = BYTES) -> Completion:
    """One prompt's first (or only) sample, generated to the end."""
    return generate(model, [prompt], params, tokenizer=tokenizer)[0]
