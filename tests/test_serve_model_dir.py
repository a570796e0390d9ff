"""``baton serve --model-dir``: a Hugging Face directory (a random Qwen2 built and saved by ``transformers``, with a
Qwen-style BPE tokenizer trained here) served over real HTTP, its replies checked against ``transformers``' own
greedy generation; then the same weights and another model's published as snapshots and swapped in."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

import storage
from harness.launch import baton_serve
from infer.hf import read_model_dir
from tests.test_tokenizer import qwen_style

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=340, max_position_embeddings=256, initializer_range=0.15)
PROMPT = "The policy gradient"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, ça va ? 😀"}]
STEPS = 16


def qwen2(seed: int):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(**SIZES)
    return transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """{name: (directory, transformers model)}: two Qwen2 models with different weights and the same tokenizer."""
    out = {}
    for name, seed in (("qwen-a", 0), ("qwen-b", 1)):
        path = tmp_path_factory.mktemp("models") / name
        model = qwen2(seed)
        model.save_pretrained(path, safe_serialization=True)
        qwen_style(path)  # tokenizer.json, tokenizer_config.json and the stop ids in generation_config.json
        out[name] = (path, model)
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(str(model_dir["qwen-a"][0]))


def greedy(model, tokenizer, ids: list[int]) -> list[int]:
    """``transformers``' greedy continuation of ``ids``, cut before the first stop token (which Baton leaves out)."""
    stops = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False, eos_token_id=stops,
                             pad_token_id=stops[0])[0, len(ids):].tolist()
    return next((out[:i] for i, t in enumerate(out) if t in stops), out)


def completion_ids(url: str, prompt: str = PROMPT) -> tuple[list[int], dict]:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": STEPS, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"], r.json()


def update(url: str, version: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/update_weights", json={"version": version, **body}, timeout=120)


def test_model_dir_alone_serves_its_weights_tokenizer_and_chat_template(model_dir, hf_tokenizer):
    path, model = model_dir["qwen-a"]
    with baton_serve(None, "--model-dir", str(path)) as url:
        weights = httpx.get(f"{url}/v1/weights").json()
        assert (weights["version"], weights["source_level"], weights["source"]) == ("qwen-a", 0, "model directory")
        models = httpx.get(f"{url}/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["qwen-a"]
        assert models[0]["max_model_len"] == SIZES["max_position_embeddings"]

        ids, body = completion_ids(url)
        assert body["usage"]["prompt_tokens"] == len(hf_tokenizer(PROMPT)["input_ids"])
        assert len(ids) == STEPS and ids == greedy(model, hf_tokenizer, hf_tokenizer(PROMPT)["input_ids"])
        assert body["choices"][0]["text"] == hf_tokenizer.decode(ids)

        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": STEPS,
                                                            "temperature": 0}, timeout=60)
        assert r.status_code == 200, r.text
        prompt = hf_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
        chat_ids = hf_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        message = r.json()["choices"][0]["message"]
        assert len(message["token_ids"]) == STEPS and message["token_ids"] == greedy(model, hf_tokenizer, chat_ids)
        assert r.json()["weight_version"] == "qwen-a"

        r = update(url, "v1")  # no --snapshot-root: the request must name one
        assert r.status_code == 400 and "snapshot_root" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/weights").json()["version"] == "qwen-a"


def test_published_weights_swap_in_and_match_transformers(model_dir, hf_tokenizer, tmp_path):
    """Both models published as snapshots: the directory's own weights come back bit-identical, the other model's
    greedy tokens are ``transformers``' for that model."""
    root = tmp_path / "snapshots"
    for version, name in (("v1", "qwen-a"), ("v2", "qwen-b")):
        _, weights = read_model_dir(str(model_dir[name][0]))
        storage.publish(dict(weights), str(root), version, part_bytes=64 << 10)
    ids = hf_tokenizer(PROMPT)["input_ids"]
    path, model_a = model_dir["qwen-a"]
    with baton_serve(None, "--model-dir", str(path), "--swap", "double_buffer") as url:
        base = httpx.get(f"{url}/v1/weights").json()["digest"]
        assert update(url, "v2", snapshot_root=str(root)).status_code == 200
        got, body = completion_ids(url)
        assert body["weight_version"] == "v2" and got == greedy(model_dir["qwen-b"][1], hf_tokenizer, ids)
        assert update(url, "v1", snapshot_root=str(root)).status_code == 200
        assert httpx.get(f"{url}/v1/weights").json()["digest"] == base
        assert completion_ids(url)[0] == greedy(model_a, hf_tokenizer, ids)

    # architecture and tokenizer from the directory, weights from the snapshot root
    with baton_serve(str(root), "--model-dir", str(path), "--version", "v2") as url:
        got, body = completion_ids(url)
        assert body["weight_version"] == "v2" and got == greedy(model_dir["qwen-b"][1], hf_tokenizer, ids)


@pytest.mark.parametrize("field, value, named", [
    ("architectures", ["GPT2LMHeadModel"], "GPT2LMHeadModel"),
    ("hidden_size", None, "hidden_size"),
])
def test_a_bad_config_exits_within_seconds_naming_the_field(model_dir, tmp_path, field, value, named):
    import json
    import shutil

    path = tmp_path / "bad"
    shutil.copytree(model_dir["qwen-a"][0], path)
    doc = json.loads((path / "config.json").read_text())
    if value is None:
        del doc[field]
    else:
        doc[field] = value
    (path / "config.json").write_text(json.dumps(doc))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "baton_cli", "serve", "--model-dir", str(path), "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and named in done.stderr and "config.json" in done.stderr
    assert time.monotonic() - start < 60
