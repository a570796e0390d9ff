"""The engine in-process: batching that does not change a single bit of any reply, n samples sharing a prefill,
logprobs equal to the trainer's forward, scoring, and a bounded KV pool that queues instead of failing."""

from __future__ import annotations

import numpy as np
import paddle
import pytest

from infer.config import get_config
from infer.engine import Engine, EngineConfig
from infer.events import Finished, Started, Token
from infer.generate import Fixed, collect, complete, generate
from infer.model import build_model, token_logprobs
from infer.sampling import SamplingParams
from infer.tokenizer import encode

PROMPT = encode("The policy says")


@pytest.fixture(scope="module")
def tiny():
    return build_model(get_config("tiny"), seed=1)


def mixed_requests(count: int, seed: int = 0) -> list[tuple[list[int], SamplingParams]]:
    """Prompts of 1-90 bytes, 1-40 new tokens, greedy and sampled, each with logprobs."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        prompt = encode("".join(chr(int(c)) for c in rng.integers(97, 123, int(rng.integers(1, 90)))))
        out.append((prompt, SamplingParams(max_tokens=int(rng.integers(1, 40)), temperature=float(rng.choice([0, 0.8])),
                                           top_p=float(rng.choice([1.0, 0.9])), seed=i, logprobs=2)))
    return out


def run_together(model, requests, settings: EngineConfig = EngineConfig()):
    engine = Engine(Fixed(model), model.config, settings)
    sinks = [[] for _ in requests]
    for (prompt, params), sink in zip(requests, sinks):
        engine.submit([prompt], params, sink.append)
    engine.run_until_idle()
    return engine, [collect(sink, params.n, params.n) for sink, (_, params) in zip(sinks, requests)]


def trainer_logprobs(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """What a trainer computes: one full forward over prompt + answer, log-softmax at each answer token."""
    with paddle.no_grad():
        logits = model(paddle.to_tensor([prompt + tokens], dtype="int64"))[0, len(prompt) - 1 : -1]
        return token_logprobs(logits, paddle.to_tensor(tokens, dtype="int64")).numpy()


def test_64_requests_batched_give_the_same_bits_as_each_alone(tiny):
    requests = mixed_requests(64)
    _, together = run_together(tiny, requests, EngineConfig(max_batched_tokens=96))
    for (prompt, params), (batched,) in zip(requests, together):
        alone = complete(tiny, prompt, params)
        assert batched.tokens == alone.tokens
        assert [lp.logprob for lp in batched.logprobs] == [lp.logprob for lp in alone.logprobs]
        assert [lp.top for lp in batched.logprobs] == [lp.top for lp in alone.logprobs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_served_logprobs_are_the_trainers_bit_for_bit(dtype):
    model = build_model(get_config("tiny", dtype=dtype), seed=2)
    for prompt, params in mixed_requests(6, seed=1):
        out = complete(model, prompt, SamplingParams(**{**params.__dict__, "temperature": 1.0}))
        served = np.array([lp.logprob for lp in out.logprobs], np.float32)
        np.testing.assert_array_equal(served, trainer_logprobs(model, prompt, out.tokens))


def test_echo_scores_the_prompt_like_the_trainer(tiny):
    out = complete(tiny, PROMPT, SamplingParams(max_tokens=0, echo=True, logprobs=1))
    assert out.tokens == [] and out.finish_reason == "length" and out.prompt_logprobs[0] is None
    scored = np.array([lp.logprob for lp in out.prompt_logprobs[1:]], np.float32)
    np.testing.assert_array_equal(scored, trainer_logprobs(tiny, PROMPT[:1], PROMPT[1:]))


def test_n_samples_share_one_prefill_and_keep_their_own_streams(tiny):
    params = dict(max_tokens=12, temperature=1.0, seed=7, logprobs=0)
    eight = generate(tiny, [PROMPT], SamplingParams(n=8, **params))
    four = generate(tiny, [PROMPT], SamplingParams(n=4, **params))
    assert [c.tokens for c in eight[:4]] == [c.tokens for c in four]  # sample i does not depend on n
    assert len({tuple(c.tokens) for c in eight}) == 8
    assert [c.tokens for c in generate(tiny, [PROMPT], SamplingParams(n=8, **params))] == [c.tokens for c in eight]
    for c in eight:
        np.testing.assert_array_equal(np.array([lp.logprob for lp in c.logprobs], np.float32),
                                      trainer_logprobs(tiny, PROMPT, c.tokens))


def test_chunked_prefill_changes_nothing(tiny):
    requests = mixed_requests(8, seed=3)
    _, small_steps = run_together(tiny, requests, EngineConfig(max_batched_tokens=8))
    _, large_steps = run_together(tiny, requests, EngineConfig(max_batched_tokens=512))
    assert [c[0].tokens for c in small_steps] == [c[0].tokens for c in large_steps]


def test_a_full_kv_pool_queues_requests_and_every_one_completes(tiny):
    requests = [(PROMPT, SamplingParams(max_tokens=30, temperature=0.8, seed=i)) for i in range(12)]
    engine = Engine(Fixed(tiny), tiny.config, EngineConfig(max_num_seqs=64, kv_cache_mb=1))
    engine.pool = type(engine.pool)(tiny.config, 9)  # room for two requests at a time (3 pages each + 2 spare)
    sinks = [[] for _ in requests]
    for (prompt, params), sink in zip(requests, sinks):
        engine.submit([prompt], params, sink.append)
    peak = 0
    while engine.step() or engine.waiting or engine.running:
        peak = max(peak, engine.running)
    assert peak == 2 and engine.pool.free == engine.pool.capacity
    for (prompt, params), sink in zip(requests, sinks):
        assert collect(sink, 1, 1)[0].tokens == complete(tiny, prompt, params).tokens


def test_an_aborted_request_frees_its_pages_at_the_next_step(tiny):
    engine = Engine(Fixed(tiny), tiny.config)
    events = []
    params = SamplingParams(max_tokens=100, n=3, temperature=1.0, seed=3, ignore_eos=True)  # none may end early
    request = engine.submit([PROMPT], params, events.append)
    for _ in range(3):
        engine.step()
    assert engine.running == 3 and engine.pool.free < engine.pool.capacity
    engine.abort(request)
    engine.step()
    assert engine.running == 0 and engine.pool.free == engine.pool.capacity
    assert isinstance(events[0], Started) and sum(isinstance(e, Token) for e in events) == 9
    assert sorted(e.choice for e in events if isinstance(e, Finished) and e.reason == "abort") == [0, 1, 2]


def test_requests_that_could_never_run_are_refused_at_once(tiny):
    engine = Engine(Fixed(tiny), tiny.config, EngineConfig(max_num_seqs=4))
    with pytest.raises(ValueError, match="max-num-seqs"):
        engine.submit([PROMPT], SamplingParams(n=8), lambda e: None)
    with pytest.raises(ValueError, match="no room in the context"):
        engine.submit([[1] * 256], SamplingParams(), lambda e: None)
    with pytest.raises(ValueError, match="n must be"):
        SamplingParams(n=65)
