"""The inference server over real HTTP: `baton serve` in a subprocess, httpx and the official openai client.

Every expected text is computed offline here, by building the model from the same state dict in this process.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

import storage
from harness.launch import baton_serve
from infer.config import get_config
from infer.generate import SamplingParams, complete
from infer.model import build_model, random_state_dict
from infer.tokenizer import encode
from infer.weights import state_digest
from storage.tp import split_state_dict

CONFIG = get_config("tiny")
SEEDS = {"v1": 1, "v2": 2}
PROMPT = "The policy"


def publish_versions(root: Path, part_bytes: int = 64 * 1024) -> None:
    for version, seed in SEEDS.items():
        storage.publish(random_state_dict(CONFIG, seed), str(root), version, part_bytes=part_bytes)


_models: dict[str, object] = {}


def offline_model(version: str):
    if version not in _models:
        _models[version] = build_model(CONFIG, random_state_dict(CONFIG, SEEDS[version]))
    return _models[version]


def offline_text(version: str, prompt: str = PROMPT, **sampling) -> str:
    return complete(offline_model(version), encode(prompt), SamplingParams(**sampling)).text


def offline_digest(version: str) -> str:
    return state_digest(offline_model(version).state_dict())


def completion(url: str, prompt: str = PROMPT, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": prompt, **body}, timeout=60)


def update(url: str, version: str, headers: dict | None = None, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/update_weights", json={"version": version, **body}, headers=headers, timeout=60)


def serving(url: str) -> dict:
    return httpx.get(f"{url}/v1/weights", timeout=10).json()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("snapshots")
    publish_versions(path)
    return path


@pytest.fixture(scope="module", params=["in_place", "double_buffer"])
def server(request, root):
    with baton_serve(str(root), "--version", "v1", "--swap", request.param) as url:
        yield url


@pytest.fixture
def at_v1(server):
    assert update(server, "v1").status_code == 200
    return server


def test_completion_has_the_openai_shape_and_names_its_weight_version(at_v1):
    r = completion(at_v1, max_tokens=6, temperature=0)
    assert r.status_code == 200 and r.headers["x-weight-version"] == "v1"
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["weight_version"] == "v1"
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] in ("stop", "length")
    assert choice["text"] == offline_text("v1", max_tokens=6)
    want = complete(offline_model("v1"), encode(PROMPT), SamplingParams(max_tokens=6, temperature=0))
    assert choice["token_ids"] == want.tokens  # Baton's extension: the exact tokens, for RL trainers
    assert body["usage"]["prompt_tokens"] == len(encode(PROMPT))
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


def test_seeded_sampling_is_deterministic_and_matches_offline(at_v1):
    params = {"max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 5}
    a, b = completion(at_v1, **params).json(), completion(at_v1, **params).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"] == offline_text("v1", **params)


def test_openai_client_completes_and_streams(at_v1):
    client = openai.OpenAI(base_url=f"{at_v1}/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model="baton-tiny", prompt=PROMPT, max_tokens=10, temperature=0, stop=["e"])
    assert reply.choices[0].text == offline_text("v1", max_tokens=10, stop=("e",))
    assert reply.model_extra["weight_version"] == "v1"
    chunks = list(client.completions.create(model="baton-tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == offline_text("v1", max_tokens=10)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert {c.model_extra["weight_version"] for c in chunks} == {"v1"}


def test_update_changes_outputs_to_exactly_the_new_version(at_v1):
    r = update(at_v1, "v2")
    body = r.json()
    assert r.status_code == 200 and body["success"] is True and body["version"] == "v2"
    assert body["source_level"] == 1 and body["bytes"] > 0 and body["seconds"] > 0 and "v2" in body["message"]
    info = serving(at_v1)
    assert info["version"] == "v2" and info["digest"] == offline_digest("v2") and info["source"] == "chunked parts"
    r = completion(at_v1, max_tokens=8, temperature=0)
    assert r.headers["x-weight-version"] == "v2" and r.json()["choices"][0]["text"] == offline_text("v2", max_tokens=8)
    assert offline_text("v1", max_tokens=8) != offline_text("v2", max_tokens=8)


def bad_snapshots(root: Path) -> dict[str, str]:
    """Broken versions next to the good ones: version id -> what the 400 message must mention."""
    state = random_state_dict(CONFIG, 3)
    storage.publish(state, str(root), "torn", part_bytes=64 * 1024, overwrite=True)
    (root / "model_state.tp0.torn.part2.pdparams").unlink()
    storage.publish(state, str(root), "corrupt", part_bytes=64 * 1024, overwrite=True)
    part = root / "model_state.tp0.corrupt.part1.pdparams"
    data = bytearray(part.read_bytes())
    data[-5] ^= 0xFF
    part.write_bytes(bytes(data))
    storage.publish(random_state_dict(get_config("tiny", hidden=32, heads=2, kv_heads=1), 3), str(root), "other-shape",
                    overwrite=True)
    return {"missing": "No snapshot found", "torn": "part2", "corrupt": "does not match the manifest",
            "other-shape": "shape", "../etc": "version"}


def test_every_rejected_update_leaves_the_old_version_serving(at_v1, root):
    for version, mention in bad_snapshots(root).items():
        r = update(at_v1, version)
        body = r.json()
        assert r.status_code == 400 and body["success"] is False, (version, body)
        assert mention in body["message"] and "still serving 'v1'" in body["message"], (version, body["message"])
        assert serving(at_v1)["digest"] == offline_digest("v1")
    text = completion(at_v1, max_tokens=5, temperature=0).json()["choices"][0]["text"]
    assert text == offline_text("v1", max_tokens=5)


def corrupt_later_part(root: Path, version: str) -> None:
    """A version whose manifest is fine but whose last part is corrupt: only streaming verification finds it,
    after earlier parts were written."""
    storage.publish(random_state_dict(CONFIG, 4), str(root), version, part_bytes=64 * 1024, overwrite=True)
    last = max(root.glob(f"model_state.tp0.{version}.part*.pdparams"), key=lambda p: int(p.name.split("part")[1][:-9]))
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF
    last.write_bytes(bytes(data))


def test_failure_midway_restores_the_previous_version(at_v1, root):
    corrupt_later_part(root, "late-corrupt")
    r = update(at_v1, "late-corrupt", verify="stream")
    assert r.status_code == 400 and r.json()["success"] is False
    assert "restored 'v1'" in r.json()["message"] or "never touched" in r.json()["message"]
    info = serving(at_v1)
    assert info["version"] == "v1" and info["digest"] == offline_digest("v1") and info["healthy"]
    text = completion(at_v1, max_tokens=5, temperature=0).json()["choices"][0]["text"]
    assert text == offline_text("v1", max_tokens=5)


def test_update_waits_for_running_requests_and_refuses_a_second_one(tmp_path):
    """in_place: a streaming request holds v1 to its end; an update waits for it, a second update gets 409.
    The `small` model decodes slowly enough here (~50 tokens/s) for the stream to outlast both updates."""
    small = get_config("small")
    states = {v: random_state_dict(small, seed) for v, seed in SEEDS.items()}
    for version, state in states.items():
        storage.publish(state, str(tmp_path), version)
    with baton_serve(str(tmp_path), "--version", "v1", "--model", "small") as url:
        params = {"max_tokens": 150, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": PROMPT, **params}, timeout=120) as s:
            lines = s.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            results = {}
            t = threading.Thread(target=lambda: results.setdefault("first", update(url, "v2")))
            t.start()
            deadline = time.monotonic() + 60
            while serving(url)["updating"] != "v2":  # the first update holds the lock, waiting for the stream
                assert time.monotonic() < deadline and t.is_alive(), results
                time.sleep(0.01)
            second = update(url, "missing")
            assert second.status_code == 409 and "in progress" in second.json()["message"]
            rest = [line for line in lines if line.startswith("data: ")]
        t.join(60)
        chunks = [json.loads(line[6:]) for line in [first, *rest] if line != "data: [DONE]"]
        assert {c["weight_version"] for c in chunks} == {"v1"}
        text = complete(build_model(small, states["v1"]), encode(PROMPT), SamplingParams(max_tokens=150)).text
        assert "".join(c["choices"][0]["text"] for c in chunks) == text
        assert results["first"].status_code == 200 and serving(url)["version"] == "v2"
        assert serving(url)["updating"] is None


def test_admin_token_guards_updates_only(root):
    with baton_serve(str(root), "--version", "v1", "--admin-token-env", "BATON_TEST_TOKEN",
                     env={"BATON_TEST_TOKEN": "s3cret"}) as url:
        assert update(url, "v2").status_code == 401
        assert update(url, "v2", headers={"Authorization": "Bearer nope"}).status_code == 403
        assert serving(url)["version"] == "v1"
        assert update(url, "v2", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert completion(url, max_tokens=2).status_code == 200


def test_empty_root_is_unhealthy_until_an_update(tmp_path, root):
    with baton_serve(str(tmp_path / "empty"), ready=False) as url:
        assert httpx.get(f"{url}/health").status_code == 503
        r = completion(url, max_tokens=2)
        assert r.status_code == 503 and "update_weights" in r.json()["error"]["message"]
        assert update(url, "v2", snapshot_root=str(root)).status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200
        assert serving(url)["digest"] == offline_digest("v2")


def test_starts_on_the_newest_loadable_version_and_reports_metrics(tmp_path):
    publish_versions(tmp_path)
    corrupt_later_part(tmp_path, "v3-corrupt")
    with baton_serve(str(tmp_path)) as url:
        newest = "v2"
        assert storage.list_versions(str(tmp_path))[-1].version == "v3-corrupt"
        assert serving(url)["version"] == newest
        update(url, "missing")
        completion(url, max_tokens=3)
        text = httpx.get(f"{url}/metrics").text
        assert 'baton_weight_startup_loads_total{outcome="success"} 1.0' in text
        assert 'baton_weight_startup_loads_total{outcome="bad_snapshot"} 1.0' in text  # v3-corrupt at start
        assert 'baton_weight_updates_total{outcome="bad_snapshot"} 1.0' in text  # missing
        assert 'baton_weight_updates_total{outcome="success"}' not in text
        assert f'baton_weight_version{{version="{newest}"}} 1.0' in text
        assert 'baton_completion_requests_total{status="200"} 1.0' in text
        assert "baton_weight_update_seconds_bucket" in text


def test_failed_restore_reports_unhealthy_instead_of_serving_a_torn_model(tmp_path):
    publish_versions(tmp_path)
    corrupt_later_part(tmp_path, "late-corrupt")
    with baton_serve(str(tmp_path), "--version", "v1") as url:
        for f in tmp_path.glob("model_state.tp0.v1.*"):
            f.unlink()  # the version being served disappears from storage: nothing to restore from
        r = update(url, "late-corrupt", verify="stream")
        assert r.status_code == 500 and "restoring 'v1' failed" in r.json()["message"]
        assert httpx.get(f"{url}/health").status_code == 503
        assert completion(url, max_tokens=2).status_code == 503
        assert update(url, "v2").status_code == 200
        assert httpx.get(f"{url}/health").status_code == 200 and serving(url)["digest"] == offline_digest("v2")


def test_a_tensor_parallel_snapshot_loads_into_one_server(tmp_path):
    state = random_state_dict(CONFIG, SEEDS["v2"])
    for rank, shard in enumerate(split_state_dict(state, 2)):
        storage.publish(shard, str(tmp_path), "tp", rank=rank, part_bytes=64 * 1024)
    with baton_serve(str(tmp_path), "--tp-size", "2") as url:
        assert serving(url)["digest"] == offline_digest("v2")
        assert completion(url, max_tokens=6, temperature=0).json()["choices"][0]["text"] == offline_text(
            "v2", max_tokens=6)


@pytest.mark.parametrize("mode", ["in_place", "double_buffer"])
def test_no_reply_mixes_versions_under_concurrent_updates(root, mode):
    """200 completions while 10 updates flip v1 <-> v2: no errors, and every reply is exactly what the version
    it reports generates offline."""
    prompts = [f"{PROMPT} {i}" for i in range(8)]
    expected = {(v, p): offline_text(v, p, max_tokens=10) for v in SEEDS for p in prompts}
    with baton_serve(str(root), "--version", "v1", "--swap", mode) as url:
        stop = threading.Event()
        updates = []

        def flip() -> None:
            while not stop.is_set() and len(updates) < 10:
                updates.append(update(url, "v2" if len(updates) % 2 == 0 else "v1").status_code)

        flipper = threading.Thread(target=flip)
        flipper.start()
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda p: (p, completion(url, p, max_tokens=10, temperature=0)), prompts * 25))
        stop.set()
        flipper.join(60)
    assert all(r.status_code == 200 for _, r in replies)
    assert len(updates) >= 2 and all(code == 200 for code in updates)
    versions = set()
    for prompt, r in replies:
        body = r.json()
        versions.add(body["weight_version"])
        assert r.headers["x-weight-version"] == body["weight_version"]
        assert body["choices"][0]["text"] == expected[(body["weight_version"], prompt)]
    assert versions <= set(SEEDS)


# ---- the batched engine over HTTP ----------------------------------------------------------------------------

def trainer_logprobs(version: str, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """The trainer's view: one full forward over prompt + answer with the same weights."""
    import paddle

    from infer.model import token_logprobs

    with paddle.no_grad():
        logits = offline_model(version)(paddle.to_tensor([prompt_ids + tokens], dtype="int64"))
        lp = token_logprobs(logits[0, len(prompt_ids) - 1 : -1], paddle.to_tensor(tokens, dtype="int64"))
    return lp.numpy().tolist()


def test_32_concurrent_requests_give_the_bits_each_gives_alone(at_v1):
    client = openai.OpenAI(base_url=f"{at_v1}/v1", api_key="unused", max_retries=0, timeout=120)
    jobs = [dict(prompt="x" * (3 + 7 * i % 50), max_tokens=4 + i % 20, temperature=0 if i % 3 == 0 else 0.9,
                 seed=i, logprobs=2) for i in range(32)]

    def ask(job):
        choice = client.completions.create(model="baton-tiny", **job).choices[0]
        return choice.model_extra["token_ids"], choice.logprobs.token_logprobs, choice.logprobs.top_logprobs

    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, jobs))
    assert int(float(_metric(at_v1, "baton:num_requests_running"))) == 0
    for job, batched in zip(jobs, together):
        assert batched == ask(job)  # token ids, logprobs and top-k alternatives, bit for bit
        assert len(batched[0]) == len(batched[1]) == len(batched[2])


def test_n_samples_are_reproducible_distinct_and_independent_of_n(at_v1):
    client = openai.OpenAI(base_url=f"{at_v1}/v1", api_key="unused", max_retries=0, timeout=120)

    def ask(n):
        return client.completions.create(model="baton-tiny", prompt=PROMPT, max_tokens=12, temperature=1.0,
                                         seed=11, n=n, logprobs=1)

    eight = ask(8)
    ids = [c.model_extra["token_ids"] for c in eight.choices]
    assert [c.index for c in eight.choices] == list(range(8)) and len(set(map(tuple, ids))) == 8
    assert [c.model_extra["token_ids"] for c in ask(8).choices] == ids
    assert [c.model_extra["token_ids"] for c in ask(4).choices] == ids[:4]
    assert eight.usage.completion_tokens == sum(map(len, ids))
    for c in eight.choices:
        assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == len(c.model_extra["token_ids"])
        assert all(len(top) in (1, 2) for top in c.logprobs.top_logprobs)


def test_logprobs_and_echo_scores_equal_the_trainers_forward(at_v1):
    body = completion(at_v1, max_tokens=10, temperature=1.0, seed=3, logprobs=5).json()
    choice = body["choices"][0]
    assert choice["logprobs"]["token_logprobs"] == trainer_logprobs("v1", encode(PROMPT), choice["token_ids"])
    assert all(len(top) in (5, 6) for top in choice["logprobs"]["top_logprobs"])
    scored = completion(at_v1, max_tokens=0, echo=True, logprobs=1).json()["choices"][0]
    ids = encode(PROMPT)
    assert scored["text"] == PROMPT and scored["token_ids"] == ids and scored["logprobs"]["token_logprobs"][0] is None
    assert scored["logprobs"]["token_logprobs"][1:] == trainer_logprobs("v1", ids[:1], ids[1:])


def test_limits_are_400s_that_name_the_field(at_v1):
    for field, value in (("n", 65), ("logprobs", 21)):
        r = completion(at_v1, **{field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"]


def _metric(url: str, name: str) -> str:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return line.split()[1]
    raise AssertionError(f"{name} not in /metrics")


def test_a_full_kv_cache_queues_requests_and_every_one_completes(root):
    with baton_serve(str(root), "--version", "v1", "--max-num-seqs", "2") as url:
        jobs = [f"{PROMPT} {i}" for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda p: completion(url, p, max_tokens=20, temperature=0), jobs))
        assert all(r.status_code == 200 for r in replies)
        for p, r in zip(jobs, replies):
            assert r.json()["choices"][0]["text"] == offline_text("v1", p, max_tokens=20)


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """``small`` decodes slowly enough here (~60 tokens/s alone) for a stream to outlast what a test does."""
    path = tmp_path_factory.mktemp("small")
    for version, seed in SEEDS.items():
        storage.publish(random_state_dict(get_config("small"), seed), str(path), version)
    with baton_serve(str(path), "--version", "v1", "--model", "small", "--drain-timeout", "0.5") as url:
        yield url


def long_stream(url: str) -> httpx.Response:
    return httpx.stream("POST", f"{url}/v1/completions", timeout=120,
                        json={"prompt": PROMPT, "max_tokens": 800, "stream": True, "ignore_eos": True})


def test_a_dropped_stream_frees_its_sequence_at_the_next_step(small_server):
    url = small_server
    before = float(_metric(url, "baton:generation_tokens_total"))
    with long_stream(url) as s:
        lines = s.iter_lines()  # kept: a discarded line iterator would close the stream here already
        next(line for line in lines if line.startswith("data: "))
        assert _metric(url, "baton:num_requests_running") == "1.0"
    deadline = time.monotonic() + 10
    while _metric(url, "baton:num_requests_running") != "0.0" or _metric(url, "baton:kv_cache_usage_perc") != "0.0":
        assert time.monotonic() < deadline, "the dropped stream still holds its sequence"
        time.sleep(0.05)
    assert float(_metric(url, "baton:generation_tokens_total")) - before < 400  # stopped long before its 800
    text = httpx.get(f"{url}/metrics").text
    assert "baton:time_to_first_token_seconds_count" in text and "baton:inter_token_latency_seconds_count" in text


def test_a_client_that_gives_up_on_a_reply_frees_its_sequence(small_server):
    url = small_server
    before = float(_metric(url, "baton:generation_tokens_total"))
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 800, "ignore_eos": True}, timeout=1)
    deadline = time.monotonic() + 10
    while _metric(url, "baton:num_requests_running") != "0.0":
        assert time.monotonic() < deadline, "the abandoned request still holds its sequence"
        time.sleep(0.05)
    assert float(_metric(url, "baton:generation_tokens_total")) - before < 400


def test_an_in_place_update_ends_requests_past_the_drain_timeout(small_server):
    url = small_server
    assert update(url, "v1").status_code == 200
    with long_stream(url) as s:
        lines = s.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert update(url, "v2").status_code == 200
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks[-1]["choices"][0]["finish_reason"] == "abort"
    assert {c["weight_version"] for c in chunks} == {"v1"} and serving(url)["version"] == "v2"
