"""The rollout engine: one scheduler loop owns the model copies and generates for every request at once.

Each step admits waiting requests while the KV pool and the sequence budget allow, then runs **one** forward
over the step's rows: the next token of every decoding sequence plus prefill chunks of admitted prompts (chunked
to ``max_batched_tokens``, so a long prompt never stalls running decodes). A prompt is prefilled once; its
``n`` samples share its KV pages and draw from their own RNG streams. A request holds a model copy (and with it
its weight version) from admission to its last token, so every reply comes from exactly one version; waiting
requests hold nothing. Requests that cannot be admitted wait in order; nothing is refused for lack of room
unless it could never fit.

Results go to each request's ``sink`` as events (``infer.events``), from the engine's thread: the HTTP layer
hands them to its event loop.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import paddle
import paddle.nn.functional as F

import kernels
from infer.events import Event, Failed, Finished, Logprob, Scored, Started, Token
from infer.kvcache import Group, KVPool, PagedStep, kv_dtype, pages_for
from infer.metrics import Metrics
from infer.model import Decoder
from infer.sampling import SamplingParams, TextStream, rng_for, sample
from infer.tokenizer import BYTES, Tokenizer

log = logging.getLogger("baton.engine")


class Busy(Exception):
    """No model copy may take new requests now (an in-place update is writing): try again shortly."""


class VersionUnavailable(Exception):
    """A request named a weight version that no model copy here holds: it fails with this message, never waits."""


class ModelSource(Protocol):
    """Lends model copies: ``acquire`` returns a copy (``.model``, ``.info.version``), the one holding ``version``
    when one is named, or raises ``Busy``, ``VersionUnavailable``, or any other exception to fail the request (e.g.
    no weights loaded). A source may say where its copies live (``place``); the KV cache is made there."""

    def acquire(self, version: str | None = None) -> Any: ...

    def release(self, slot: Any) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences decoding at once (a request with n samples counts n)
    kv_cache_mb: int = 512  # upper bound of the KV pool; never more than max_num_seqs full contexts
    max_batched_tokens: int = 256  # rows per step: decode tokens first, prefill chunks fill the rest

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.kv_cache_mb < 1 or self.max_batched_tokens < 1:
            raise ValueError(f"engine settings must be positive: {self}")


# ---- the engine's own records ---------------------------------------------------------------------------------

@dataclass(eq=False)
class Request:
    prompts: list[list[int]]
    params: SamplingParams
    sink: Callable[[Event], None]
    arrival: float = field(default_factory=time.monotonic)
    aborted: str | None = None
    slot: Any = None
    pages: list[int] = field(default_factory=list)  # reserved at admission, handed to sequences at fork
    live: int = 0  # sequences not finished
    version: str | None = None  # the weight version the request must be answered from, when it names one

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.params.n


@dataclass(eq=False)
class Sequence:
    request: Request
    prompt_index: int
    tokens: list[int]  # prompt, then generated
    prompt_len: int
    budget: int  # tokens it may generate
    pages: list[int]
    cached: int = 0  # tokens whose keys and values are in the pages
    choice: int = -1  # -1: the prompt being prefilled (forks into the samples)
    rng: np.random.Generator | None = None
    text: TextStream | None = None
    prompt_logprobs: list = field(default_factory=list)
    last_token_at: float = 0.0

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len

    def slot_of(self, position: int) -> int:
        return self.pages[position // kernels.PAGE] * kernels.PAGE + position % kernels.PAGE


def keep_freed_memory() -> None:
    """Stops glibc from handing freed blocks of up to 32 MiB back to the OS. Paddle's CPU build allocates fresh
    tensors for every op; without this each one page-faults its memory in again, which made a batched step's
    intermediates (a few MiB each) 5-7x slower to fill here. The model and pages are allocated once, so this
    keeps at most one step's working set."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks below 32 MiB come from the (kept) heap


def model_place(source: ModelSource):
    """Where ``source``'s model copies live: its own ``place`` when it says, else where Paddle creates parameters
    now (``Decoder`` put them there when the source built its copies before the engine)."""
    place = getattr(source, "place", None)
    return place if place is not None else paddle.framework._current_expected_place()


STREAM_CONTEXT = 4  # prompt tokens a sample's detokeniser starts after (a SentencePiece space shows after them)


class Engine:
    def __init__(self, source: ModelSource, config, settings: EngineConfig = EngineConfig(),
                 metrics: Metrics | None = None, tokenizer: Tokenizer = BYTES):
        keep_freed_memory()
        kernels.use_every_core()
        self.source, self.config, self.settings = source, config, settings
        self.tokenizer = tokenizer  # its stop_ids end samples; it turns their tokens into text
        self.metrics = metrics or Metrics()
        per_seq = pages_for(config.max_seq_len)
        place = model_place(source)
        dtype = kv_dtype(config.dtype, place)
        budget_pages = settings.kv_cache_mb * 2**20 // KVPool.page_bytes(config, dtype)
        self.pool = KVPool(config, 1 + min(budget_pages, settings.max_num_seqs * per_seq), dtype, place)
        self._inbox: deque[Request] = deque()
        self._waiting: deque[Request] = deque()
        self._prefilling: list[Sequence] = []
        self._decoding: list[Sequence] = []
        self._abort_slots: set[int] = set()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- the client side (any thread) ------------------------------------------------------------------------

    def submit(self, prompts: list[list[int]], params: SamplingParams, sink: Callable[[Event], None],
               version: str | None = None) -> Request:
        """Queues a request; its events go to ``sink``; ``version``: only that weight version may answer it. Raises
        ``ValueError`` for one that could never run."""
        params = params.with_seed()
        for ids in prompts:
            if not ids:
                raise ValueError("the prompt is empty")
            if len(ids) >= self.config.max_seq_len and params.max_tokens > 0:
                raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the context of "
                                 f"{self.config.max_seq_len}")
            if len(ids) > self.config.max_seq_len:
                raise ValueError(f"prompt of {len(ids)} tokens exceeds the context of {self.config.max_seq_len}")
        request = Request(prompts, params, sink, version=version)
        if request.sequences > self.settings.max_num_seqs:
            raise ValueError(f"{request.sequences} sequences (prompts x n) exceed --max-num-seqs "
                             f"{self.settings.max_num_seqs}")
        if self._pages_needed(request) > self.pool.capacity:
            raise ValueError(f"this request needs {self._pages_needed(request) * kernels.PAGE} tokens of KV cache, "
                             f"more than the whole pool ({self.pool.capacity * kernels.PAGE}); raise --kv-cache-mb "
                             "or lower max_tokens or n")
        with self._cv:
            self._inbox.append(request)
            self._cv.notify()
        return request

    def abort(self, request: Request, reason: str = "abort") -> None:
        """Ends the request at the next step (a client went away); its pages and model copy are freed."""
        with self._cv:
            request.aborted = request.aborted or reason
            self._cv.notify()

    def abort_slot(self, slot: Any) -> None:
        """Ends every request on ``slot`` at the next step with ``finish_reason: "abort"`` (an update stops
        waiting for them)."""
        with self._cv:
            self._abort_slots.add(id(slot))
            self._cv.notify()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="baton-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(30)

    @property
    def running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    @property
    def waiting(self) -> int:
        return len(self._waiting) + len(self._inbox)

    # ---- the loop ---------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        with paddle.no_grad():
            while True:
                with self._cv:
                    if self._stopping:
                        return
                    if not self.running and not self._inbox and not self._waiting:
                        self._cv.wait(0.5)
                        continue
                try:
                    worked = self.step()
                except Exception:  # noqa: BLE001 - a bug must not kill the loop: fail what was running
                    log.exception("engine step failed; failing its requests")
                    for request in {id(s.request): s.request for s in self._prefilling + self._decoding}.values():
                        self._fail(request, "engine_error", "the engine failed on this request; see the server log")
                    worked = True
                if not worked:
                    with self._cv:
                        self._cv.wait(0.005)  # waiting for room or for a model copy (an update is writing)

    def step(self) -> bool:
        """One scheduler step; False when there was nothing to compute."""
        self._take_inbox()
        self._reap()
        self._admit()
        self._update_gauges()  # before the forward: a client may read its first token before the step ends
        decode = list(self._decoding)
        room = max(self.settings.max_batched_tokens - len(decode), 0)
        chunks: list[tuple[Sequence, int]] = []
        for seq in self._prefilling:
            if room <= 0:
                break
            take = min(seq.prompt_len - seq.cached, room)
            chunks.append((seq, take))
            room -= take
        if not decode and not chunks:
            return False
        for slot in {id(s.request.slot): s.request.slot for s in decode + [c for c, _ in chunks]}.values():
            self._forward(slot, [s for s in decode if s.request.slot is slot],
                          [(s, n) for s, n in chunks if s.request.slot is slot])
        self._update_gauges()
        return True

    def run_until_idle(self) -> None:
        """Steps until every submitted request has finished (offline use, no thread)."""
        with paddle.no_grad():
            while self.step() or self._inbox or self._waiting or self.running:
                pass

    # ---- admission and release -------------------------------------------------------------------------------

    def _take_inbox(self) -> None:
        with self._cv:
            self._waiting.extend(self._inbox)
            self._inbox.clear()

    def _pages_needed(self, request: Request) -> int:
        total = 0
        for ids in request.prompts:
            prompt_pages, full = pages_for(len(ids)), len(ids) // kernels.PAGE
            own = pages_for(len(ids) + self._budget(request, ids)) - full
            total += prompt_pages + (request.params.n - 1) * own + (own - (prompt_pages - full))
        return total

    def _budget(self, request: Request, ids: list[int]) -> int:
        return min(request.params.max_tokens, self.config.max_seq_len - len(ids))

    def _admit(self) -> None:
        seqs = self.running
        while self._waiting:
            request = self._waiting[0]
            if request.aborted:
                self._waiting.popleft()
                self._finish_unstarted(request)
                continue
            need = self._pages_needed(request)
            if seqs + request.sequences > self.settings.max_num_seqs or need > self.pool.free:
                return  # first come, first served: later requests wait behind this one
            try:
                slot = self.source.acquire(request.version) if request.version else self.source.acquire()
            except Busy:
                return
            except VersionUnavailable as exc:
                self._waiting.popleft()
                request.sink(Failed("version_unavailable", str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - no weights to serve: tell the client why
                self._waiting.popleft()
                request.sink(Failed("no_weights", str(exc)))
                continue
            self._waiting.popleft()
            request.slot, request.pages = slot, self.pool.allocate(need)
            request.live = request.sequences
            seqs += request.sequences
            request.sink(Started(slot.info.version))
            for i, ids in enumerate(request.prompts):
                pages = self._take_pages(request, pages_for(len(ids)))
                self._prefilling.append(Sequence(request, i, list(ids), len(ids), self._budget(request, ids), pages))

    def _take_pages(self, request: Request, count: int) -> list[int]:
        taken, request.pages = request.pages[:count], request.pages[count:]
        return taken

    def _reap(self) -> None:
        """Ends aborted requests and those on a model copy that an update stopped waiting for."""
        with self._cv:
            slots, self._abort_slots = self._abort_slots, set()
        for seq in self._prefilling + self._decoding:
            request = seq.request
            if id(request.slot) in slots:
                request.aborted = request.aborted or "abort"
            if request.aborted:
                self._end(seq, "abort")

    def _end(self, seq: Sequence, reason: str) -> None:
        """Finishes a sequence: frees its pages; the last one of a request returns the model copy."""
        if seq in self._decoding:
            self._decoding.remove(seq)
        elif seq in self._prefilling:
            self._prefilling.remove(seq)
        else:
            return
        self.pool.release(seq.pages)
        request = seq.request
        if seq.choice < 0:  # a prompt that never forked: its samples end with it
            for i in range(request.params.n):
                request.sink(Finished(seq.prompt_index * request.params.n + i, reason, ""))
            request.live -= request.params.n
        else:
            request.sink(Finished(seq.choice, reason, seq.text.close() if reason != "abort" else ""))
            request.live -= 1
        if request.live == 0:
            self.pool.release(request.pages)
            request.pages = []
            self.source.release(request.slot)

    def _finish_unstarted(self, request: Request) -> None:
        for choice in range(request.sequences):
            request.sink(Finished(choice, "abort", ""))

    def _fail(self, request: Request, reason: str, message: str) -> None:
        request.sink(Failed(reason, message))
        request.aborted = "abort"
        for seq in [s for s in self._prefilling + self._decoding if s.request is request]:
            self._end(seq, "abort")

    # ---- one forward -----------------------------------------------------------------------------------------

    def _forward(self, slot: Any, decode: list[Sequence], chunks: list[tuple[Sequence, int]]) -> None:
        tokens, positions, slots, groups, logit_rows = [], [], [], [], []
        if decode:
            blocks = max(pages_for(s.cached + 1) for s in decode)
            table = np.zeros((len(decode), blocks), np.int64)
            for i, s in enumerate(decode):
                table[i, : min(len(s.pages), blocks)] = s.pages[:blocks]
                tokens.append(s.tokens[-1])
                positions.append(s.cached)
                slots.append(s.slot_of(s.cached))
            groups.append(Group(0, table, np.array(positions, np.int64)[:, None]))
            logit_rows.extend(range(len(decode)))
        wants = []  # (sequence, rows of logits it reads, start of those rows in logit_rows)
        for seq, take in chunks:
            start = len(tokens)
            span = list(range(seq.cached, seq.cached + take))
            tokens.extend(seq.tokens[seq.cached : seq.cached + take])
            positions.extend(span)
            slots.extend(seq.slot_of(p) for p in span)
            groups.append(Group(start, np.array([seq.pages[: pages_for(span[-1] + 1)]], np.int64),
                                np.array([span], np.int64)))
            scoring = seq.request.params.echo and seq.request.params.logprobs is not None
            done = seq.cached + take == seq.prompt_len
            rows = list(range(start, start + take)) if scoring else ([start + take - 1] if done else [])
            wants.append((seq, take, len(logit_rows), len(rows)))
            logit_rows.extend(rows)
        step = PagedStep(self.pool, np.array(slots, np.int64), groups, self.config.heads)
        model: Decoder = slot.model
        place = model.place
        logits = model.run(paddle.to_tensor(tokens, "int64", place), paddle.to_tensor(positions, "int64", place), step,
                           paddle.to_tensor(logit_rows, "int64", place))
        needs_logp = any(s.request.params.logprobs is not None for s in decode) or any(
            s.request.params.logprobs is not None for s, *_ in wants)
        logp = F.log_softmax(logits, axis=-1).numpy() if needs_logp else None
        logits = logits.numpy()
        now = time.monotonic()
        for i, seq in enumerate(list(decode)):
            seq.cached += 1
            self._emit(seq, logits[i], logp[i] if logp is not None else None, now)
        for seq, take, first, count in wants:
            if count > 1 or (count == 1 and seq.request.params.echo and seq.request.params.logprobs is not None):
                self._score(seq, take, logp[first : first + count])
            seq.cached += take
            if seq.cached == seq.prompt_len:
                last = first + count - 1
                self._fork(seq, logits[last], logp[last] if logp is not None else None, now)

    def _score(self, seq: Sequence, take: int, logp: np.ndarray) -> None:
        """Prompt scoring (``echo`` with logprobs): row i predicts prompt token i + 1."""
        k = seq.request.params.logprobs
        for i in range(take):
            position = seq.cached + i
            if position + 1 < seq.prompt_len:
                seq.prompt_logprobs.append(_logprob(logp[i], seq.tokens[position + 1], k))

    def _fork(self, prompt: Sequence, logits: np.ndarray, logp: np.ndarray | None, now: float) -> None:
        """The prompt is in the cache: its samples start, sharing its full pages."""
        request = prompt.request
        self._prefilling.remove(prompt)
        if request.params.echo:
            request.sink(Scored(prompt.prompt_index, tuple(prompt.tokens),
                                (None, *prompt.prompt_logprobs) if request.params.logprobs is not None else ()))
        full = prompt.prompt_len // kernels.PAGE
        own = pages_for(prompt.prompt_len + prompt.budget) - full
        partial = prompt.pages[full:]
        for i in range(request.params.n):
            pages = self.pool.share(prompt.pages[:full])
            if i == 0:
                pages += partial + self._take_pages(request, own - len(partial))
            else:
                mine = self._take_pages(request, own)
                for src, dst in zip(partial, mine):
                    self.pool.copy_page(src, dst)
                pages += mine
            seq = Sequence(request, prompt.prompt_index, list(prompt.tokens), prompt.prompt_len, prompt.budget,
                           pages, cached=prompt.prompt_len, choice=prompt.prompt_index * request.params.n + i,
                           rng=rng_for(request.params.seed, i), text=self._text_stream(prompt),
                           last_token_at=request.arrival)
            self._decoding.append(seq)
            if seq.budget == 0:
                self._end(seq, "length")
            else:
                self._emit(seq, logits, logp, now)
        self.pool.release(prompt.pages[:full])  # the samples hold their own references now

    def _text_stream(self, prompt: Sequence) -> TextStream:
        context = prompt.tokens[max(prompt.prompt_len - STREAM_CONTEXT, 0) : prompt.prompt_len]
        return TextStream(self.tokenizer.stream(context), prompt.request.params.stop)

    def _emit(self, seq: Sequence, logits: np.ndarray, logp: np.ndarray | None, now: float) -> None:
        """Samples the sequence's next token from its logits and tells the client."""
        params = seq.request.params
        token = sample(logits, params, seq.rng)
        if seq.generated == 0:
            self.metrics.first_token.observe(now - seq.request.arrival)
        else:
            self.metrics.inter_token.observe(now - seq.last_token_at)
        seq.last_token_at = now
        if token in self.tokenizer.stop_ids and not params.ignore_eos:
            self._end(seq, "stop")
            return
        seq.tokens.append(token)
        self.metrics.generated.inc()
        offset = seq.text.offset
        piece = seq.text.push(token)
        info = _logprob(logp, token, params.logprobs) if params.logprobs is not None else None
        seq.request.sink(Token(seq.choice, token, piece, offset, info))
        if seq.text.stopped:
            self._end(seq, "stop")
        elif seq.generated >= seq.budget:
            self._end(seq, "length")

    def _update_gauges(self) -> None:
        self.metrics.engine_state(len(self._decoding) + len(self._prefilling), self.waiting,
                                  1 - self.pool.free / self.pool.capacity)


def _logprob(logp: np.ndarray, token: int, k: int) -> Logprob:
    top = ()
    if k:
        best = np.argpartition(-logp, k - 1)[:k]
        best = best[np.argsort(-logp[best], kind="stable")]
        top = tuple((int(t), float(logp[t])) for t in best)
    return Logprob(float(logp[token]), top)
