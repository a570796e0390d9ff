"""``/v1/chat/completions`` and ``/v1/models`` over real HTTP: uvicorn servers in this process, each with a weight
manager over published snapshots and an engine, one with the byte tokenizer (its built-in chat template), one
with a Hugging Face tokenizer (``tests.test_tokenizer``'s Llama-3-style checkpoint, whose vocabulary fits the
tiny model), one with a tokenizer that has no chat template. Every expected reply is computed offline here."""

from __future__ import annotations

import contextlib
import json

import httpx
import openai
import pytest

from infer.engine import Engine, EngineConfig
from infer.generate import SamplingParams, complete, generate
from infer.server import create_app
from infer.tokenizer import BYTES, EOS, ByteTokenizer, HFTokenizer
from infer.weights import WeightManager
from tests.test_server import CONFIG, offline_model, publish_versions
from tests.test_server_errors import REQUESTS, completion_error, in_process, metric
from tests.test_tokenizer import llama3_style, no_post_processor

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, ça va ? 😀"}]


@contextlib.contextmanager
def server(root, tokenizer):
    manager = WeightManager(CONFIG, str(root))
    manager.update("v1", startup=True)
    engine = Engine(manager, CONFIG, EngineConfig(), manager.metrics, tokenizer=tokenizer).start()
    manager.on_drain_timeout = engine.abort_slot
    try:
        with in_process(create_app(manager, engine, "baton-tiny")) as url:
            yield url
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-snapshots")
    publish_versions(path)
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(ours, transformers') for the Llama-3-style checkpoint: BOS from its post-processor, two stop ids."""
    from transformers import AutoTokenizer

    path = llama3_style(tmp_path_factory.mktemp("hf") / "llama3")
    return HFTokenizer.from_dir(str(path)), AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def byte_url(root):
    with server(root, BYTES) as url:
        yield url


@pytest.fixture(scope="module")
def hf_url(root, hf):
    assert hf[0].vocab_size <= CONFIG.vocab_size
    with server(root, hf[0]) as url:
        yield url


def chat(url: str, messages=MESSAGES, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, **body}, timeout=60)


def events(r: httpx.Response) -> list[dict]:
    lines = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(line[6:]) for line in lines[:-1]]


def prompt_ids(tokenizer, messages=MESSAGES) -> list[int]:
    return tokenizer.encode(tokenizer.render_chat(messages), add_special_tokens=False)


def test_chat_reply_has_openai_s_shape_the_tokens_and_the_weight_version(byte_url):
    r = chat(byte_url, max_tokens=8, temperature=0.9, seed=3, n=2)
    assert r.status_code == 200 and r.headers["x-weight-version"] == "v1"
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["weight_version"] == "v1" and body["model"] == "baton-tiny"
    prompt = prompt_ids(BYTES)
    assert BYTES.decode(prompt) == "<|system|>\nBe brief.\n<|user|>\nHi there, ça va ? 😀\n<|assistant|>\n"
    assert body["prompt_token_ids"] == prompt and body["usage"]["prompt_tokens"] == len(prompt)
    want = generate(offline_model("v1"), [prompt], SamplingParams(8, 0.9, seed=3, n=2))
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for choice, w in zip(body["choices"], want):
        assert choice["message"] == {"role": "assistant", "content": w.text, "token_ids": w.tokens}
        assert choice["finish_reason"] == w.finish_reason and choice["logprobs"] is None
    assert body["usage"]["completion_tokens"] == sum(len(w.tokens) for w in want)


def test_chat_streams_the_same_reply_chunk_by_chunk(byte_url, hf_url, hf):
    for url, _tokenizer in ((byte_url, BYTES), (hf_url, hf[0])):
        params = {"max_tokens": 12, "temperature": 0.8, "seed": 7, "n": 2}
        whole = chat(url, **params).json()
        r = chat(url, stream=True, **params)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = events(r)
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert {c["weight_version"] for c in chunks} == {whole["weight_version"]}
        assert len({c["id"] for c in chunks}) == 1
        for i, choice in enumerate(whole["choices"]):
            mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
            assert mine[0]["delta"] == {"role": "assistant", "content": ""}
            assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
            assert sum((c["delta"].get("token_ids", []) for c in mine), []) == choice["message"]["token_ids"]
            assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
            assert all(c["finish_reason"] is None for c in mine[:-1])


def test_the_openai_client_chats_and_streams(byte_url):
    client = openai.OpenAI(base_url=f"{byte_url}/v1", api_key="unused", max_retries=0)
    want = complete(offline_model("v1"), prompt_ids(BYTES), SamplingParams(max_tokens=6, temperature=0))
    reply = client.chat.completions.create(model="baton-tiny", messages=MESSAGES, max_completion_tokens=6,
                                           temperature=0)
    assert reply.choices[0].message.content == want.text and reply.choices[0].message.role == "assistant"
    assert reply.model_extra["weight_version"] == "v1" and reply.usage.completion_tokens == len(want.tokens)
    chunks = list(client.chat.completions.create(model="baton-tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_chat_with_a_hugging_face_tokenizer_renders_and_encodes_as_transformers(hf_url, hf):
    ours, ref = hf
    r = chat(hf_url, max_tokens=10, temperature=0.7, seed=11)
    body = r.json()
    prompt = ref.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert body["prompt_token_ids"] == prompt and prompt[0] == ref.bos_token_id  # once: the template writes it
    want = complete(offline_model(body["weight_version"]), prompt, SamplingParams(10, 0.7, seed=11), tokenizer=ours)
    assert body["choices"][0]["message"]["content"] == want.text
    assert body["choices"][0]["message"]["token_ids"] == want.tokens


def test_completions_with_a_hugging_face_tokenizer_add_its_special_tokens(hf_url, hf):
    ours, ref = hf
    body = httpx.post(f"{hf_url}/v1/completions", json={"prompt": "naïve 😀 text", "max_tokens": 0, "echo": True,
                                                         "logprobs": 0}, timeout=60).json()
    ids = ref("naïve 😀 text")["input_ids"]
    choice = body["choices"][0]
    assert ids[0] == ref.bos_token_id and choice["token_ids"] == ids and body["usage"]["prompt_tokens"] == len(ids)
    assert choice["text"] == "naïve 😀 text" and choice["logprobs"]["tokens"] == [ours.token_str(t) for t in ids]


def test_chat_logprobs_have_the_chat_shape(hf_url, hf):
    ours, _ = hf
    body = chat(hf_url, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3).json()
    choice = body["choices"][0]
    want = complete(offline_model(body["weight_version"]), body["prompt_token_ids"],
                    SamplingParams(max_tokens=6, temperature=0, logprobs=3), tokenizer=ours)
    content = choice["logprobs"]["content"]
    assert len(content) == len(choice["message"]["token_ids"]) == len(want.logprobs)
    for entry, token, lp in zip(content, choice["message"]["token_ids"], want.logprobs):
        assert entry["token"] == ours.token_str(token) and entry["bytes"] == list(ours.token_bytes(token))
        assert entry["logprob"] == pytest.approx(lp.logprob)
        assert [(t["token"], t["logprob"]) for t in entry["top_logprobs"]] == \
            [(ours.token_str(t), pytest.approx(v)) for t, v in lp.top]
    none = chat(hf_url, max_tokens=2, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert all(e["top_logprobs"] == [] for e in none)


def test_a_tokenizer_s_stop_ids_end_a_sample():
    """EOS is whatever the tokenizer says (generation_config may name several): the engine stops on any of them,
    leaves it out of the tokens, and says "stop"."""
    model, prompt = offline_model("v1"), BYTES.encode("The policy")
    free = complete(model, prompt, SamplingParams(max_tokens=12, ignore_eos=True))
    at = next(i for i, t in enumerate(free.tokens) if i > 0 and t not in free.tokens[:i])

    class StopsAlso(ByteTokenizer):
        stop_ids = frozenset({EOS, free.tokens[at]})

    stopped = complete(model, prompt, SamplingParams(max_tokens=12), tokenizer=StopsAlso())
    assert stopped.tokens == free.tokens[:at] and stopped.finish_reason == "stop"


def test_models_lists_the_served_model(byte_url):
    body = httpx.get(f"{byte_url}/v1/models", timeout=10).json()
    assert body["object"] == "list" and len(body["data"]) == 1
    model = body["data"][0]
    assert model["id"] == "baton-tiny" and model["object"] == "model" and model["owned_by"] == "baton"
    assert isinstance(model["created"], int) and model["max_model_len"] == CONFIG.max_seq_len
    client = openai.OpenAI(base_url=f"{byte_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["baton-tiny"]


def test_chat_errors_are_openai_errors_and_counted(root, byte_url, hf_url, tmp_path):
    before = metric(byte_url, REQUESTS % 400)
    refusals = [
        (chat(byte_url, foo=1), "unknown field 'foo'"),
        (chat(byte_url, messages=[]), "messages"),
        (chat(byte_url, top_logprobs=2), "top_logprobs"),
        (chat(byte_url, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "only text content"),
        (chat(byte_url, max_tokens=5, max_completion_tokens=6), "max_completion_tokens"),
        (chat(byte_url, presence_penalty=0.5), "presence_penalty: "),
        (chat(byte_url, messages=[{"role": "user", "content": "x" * CONFIG.max_seq_len}]),
         f"maximum context length is {CONFIG.max_seq_len} tokens"),
        (chat(byte_url, messages=[{"role": "user", "content": "x"}], max_tokens=CONFIG.max_seq_len), "max_tokens"),
        (chat(byte_url, chat_template_kwargs={"add_generation_prompt": False}), "chat_template_kwargs"),
        (chat(byte_url, messages=[{"role": "user"}]), "chat template cannot render"),  # no content
    ]
    for r, mention in refusals:
        completion_error(r, 400, mention)
    completion_error(httpx.get(f"{byte_url}/v1/chat/completions"), 405, "POST")
    assert metric(byte_url, REQUESTS % 400) - before == len(refusals)
    # a template's raise_exception names the problem
    completion_error(chat(hf_url, messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), 400,
                     "roles must alternate")
    # without max_tokens a reply may use the rest of the context
    long = [{"role": "user", "content": "y" * (CONFIG.max_seq_len - 40)}]
    body = chat(byte_url, messages=long, temperature=0, ignore_eos=True).json()
    assert len(body["prompt_token_ids"]) + len(body["choices"][0]["message"]["token_ids"]) == CONFIG.max_seq_len
    # a tokenizer without a chat template: a 400 that says so
    with server(root, HFTokenizer.from_dir(str(no_post_processor(tmp_path / "bare")))) as bare:
        completion_error(chat(bare), 400, "no chat template")
        assert metric(bare, REQUESTS % 400) == 1
        assert httpx.post(f"{bare}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_weight_updates_show_in_chat_replies(root, byte_url):
    r = httpx.post(f"{byte_url}/v1/update_weights", json={"version": "v2"}, timeout=60)
    assert r.status_code == 200, r.text
    try:
        body = chat(byte_url, max_tokens=5, temperature=0).json()
        assert body["weight_version"] == "v2"
        want = complete(offline_model("v2"), prompt_ids(BYTES), SamplingParams(max_tokens=5, temperature=0))
        assert body["choices"][0]["message"]["token_ids"] == want.tokens
        assert {c["weight_version"] for c in events(chat(byte_url, max_tokens=3, stream=True))} == {"v2"}
    finally:
        httpx.post(f"{byte_url}/v1/update_weights", json={"version": "v1"}, timeout=60)
