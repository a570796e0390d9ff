"""What the engine tells a request, in order: ``Started`` (or ``Failed``), for echo ``Scored``, then per choice
its ``Token``s and one ``Finished``. Plain values, so the HTTP layer can build replies without the engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Logprob:
    logprob: float  # raw log-softmax of the model's logits, before temperature and top-p
    top: tuple[tuple[int, float], ...]  # the k most likely tokens, most likely first


@dataclass(frozen=True)
class Started:
    version: str


@dataclass(frozen=True)
class Scored:
    prompt: int
    tokens: tuple[int, ...]
    logprobs: tuple[Logprob | None, ...]  # None for the first token (nothing predicts it)


@dataclass(frozen=True)
class Token:
    choice: int
    token: int
    text: str  # the text this token releases (may be empty: held back for a stop string or a split character)
    offset: int  # where this token's text starts in the choice's text
    logprob: Logprob | None


@dataclass(frozen=True)
class Finished:
    choice: int
    reason: str  # "stop", "length" or "abort"
    text: str  # text held back until the end


@dataclass(frozen=True)
class Failed:
    reason: str  # "no_weights" (nothing to serve yet, or a restore failed), "version_unavailable" (the version the
    # request named is not held here) or "engine_error" (a bug; see the log)
    message: str


Event = Started | Scored | Token | Finished | Failed
