"""A fleet flips as one (``sync-weights``' two phases) and a rollout can name its version: real `baton serve`
processes over HTTP, a real Prefect API, clients sending completions while the fleet syncs.

Expected texts and digests are computed here, offline, from the same state dicts."""

from __future__ import annotations

import threading
from contextlib import ExitStack

import httpx
import numpy as np
import openai
import pytest
from prefect.testing.utilities import prefect_test_harness

import flows.baton
import storage
from flows.fleet import Refused
from flows.sync import FleetSyncError, sync_weights
from harness.clients import Completions
from harness.launch import baton_serve
from infer.config import get_config
from infer.generate import SamplingParams, complete
from infer.model import build_model, random_state_dict
from infer.tokenizer import encode
from infer.weights import state_digest
from tests.conftest import free_port

CONFIG = get_config("tiny")
PROMPT = "The policy"
GREEDY = {"max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def state(seed: int) -> dict[str, np.ndarray]:
    return random_state_dict(CONFIG, seed)


def offline_text(seed: int) -> str:
    return complete(build_model(CONFIG, state(seed)), encode(PROMPT), SamplingParams(**GREEDY)).text


def digest_of(values: dict[str, np.ndarray]) -> str:
    return state_digest(build_model(CONFIG, values).state_dict())


def weights(url: str) -> dict:
    return httpx.get(f"{url}/v1/weights", timeout=10).json()


def post(url: str, path: str, **body) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def ask(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, **GREEDY, **body}, timeout=60)


@pytest.fixture(scope="module")
def snap(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("snap"))
    for seed in (1, 2, 3):
        storage.publish(state(seed), root, f"v{seed}")
    return root


@pytest.fixture(scope="module")
def fleet(snap):
    """Three double_buffer servers."""
    with ExitStack() as stack:
        yield [str(stack.enter_context(baton_serve(snap, "--version", "v1", "--swap", "double_buffer")))
               for _ in range(3)]


@pytest.fixture
def at_v1(fleet, snap):
    for url in fleet:
        post(url, "/v1/weights/abort")
        assert post(url, "/v1/update_weights", version="v1").status_code == 200
    return fleet


def test_a_member_down_at_prepare_lets_no_reply_come_from_the_new_version(at_v1, snap):
    down = f"http://127.0.0.1:{free_port()}"
    with Completions(at_v1) as load, pytest.raises(FleetSyncError) as err:
        sync_weights("v2", snap, [*at_v1, down])
    assert load.seen["v1"] > 0 and load.seen["v2"] == 0, load.seen
    assert str(err.value).count(": aborted: ") == 3 and f"{down}: unreachable" in str(err.value)
    for url in at_v1:
        now = weights(url)
        assert (now["version"], now["digest"], now["prepared"], now["spare"]) == ("v1", digest_of(state(1)), None,
                                                                                  None)


def test_a_member_refusing_at_prepare_commits_nothing(at_v1, snap, tmp_path):
    """A server running another model refuses v2 (its shapes do not fit) before the others serve it."""
    with baton_serve(snap, "--model", "small", ready=False) as other, Completions(at_v1) as load:
        with pytest.raises(FleetSyncError) as err:
            sync_weights("v2", snap, [*at_v1, str(other)])
    assert load.seen["v2"] == 0 and f"{other}: refused" in str(err.value), (load.seen, str(err.value))
    assert {weights(url)["version"] for url in at_v1} == {"v1"}


def test_every_member_taking_it_flips_together_and_keeps_the_old_version_in_the_spare(at_v1, snap):
    rows = sync_weights("v2", snap, at_v1)
    assert [r["status"] for r in rows] == ["live"] * 3 and [r["prepared"] for r in rows] == ["spare"] * 3
    assert rows[0]["guarantee"].startswith("atomic")
    expected = offline_text(2)
    for url in at_v1:
        now = weights(url)
        assert (now["version"], now["digest"], now["spare"]) == ("v2", digest_of(state(2)), "v1")
        assert ask(url).json()["choices"][0]["text"] == expected
        pinned = ask(url, weight_version="v1").json()  # the version just replaced answers from the spare
        assert (pinned["weight_version"], pinned["choices"][0]["text"]) == ("v1", offline_text(1))


def test_a_commit_failing_on_one_server_puts_the_others_back(at_v1, snap, monkeypatch):
    broken = at_v1[1]
    real = flows.baton.Baton.commit

    def commit(self, version, *args, **kwargs):
        if self.server.url == broken:
            raise Refused(f"{broken}: injected commit failure")
        return real(self, version, *args, **kwargs)

    monkeypatch.setattr(flows.baton.Baton, "commit", commit)
    with pytest.raises(FleetSyncError) as err:
        sync_weights("v2", snap, at_v1)
    assert str(err.value).count(": rolled back: ") == 2 and f"{broken}: refused: commit failed" in str(err.value)
    for url in at_v1:
        assert (weights(url)["version"], weights(url)["digest"]) == ("v1", digest_of(state(1)))


def test_a_commit_whose_reply_is_lost_counts_as_taken(at_v1, snap, monkeypatch):
    """The server flipped but its answer never came back: the flow reads what it serves instead of guessing."""
    lost = at_v1[2]
    real = flows.baton.Baton.commit

    def commit(self, version, *args, **kwargs):
        reply = real(self, version, *args, **kwargs)
        if self.server.url == lost:
            raise Refused(f"{lost}: the reply was lost")
        return reply

    monkeypatch.setattr(flows.baton.Baton, "commit", commit)
    rows = sync_weights("v2", snap, at_v1)
    assert [r["status"] for r in rows] == ["live"] * 3 and "yet it serves v2" in rows[2]["message"]
    assert {weights(url)["version"] for url in at_v1} == {"v2"}


@pytest.mark.parametrize("route", ["completions", "chat"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_request_pinned_to_the_prepared_spare_is_answered_from_it(at_v1, route, stream):
    url = at_v1[0]
    assert post(url, "/v1/weights/prepare", version="v2").json()["held"] == "spare"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")

    def run(version: str | None):
        extra = {"weight_version": version} if version else {}
        if route == "completions":
            out = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, stream=stream,
                                            extra_body=extra)
        else:
            out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0, stream=stream, extra_body=extra)
        first = next(iter(out)) if stream else out
        return first.model_extra["weight_version"]

    assert run("v2") == "v2" and run(None) == "v1" and run("v1") == "v1"
    with pytest.raises(openai.APIStatusError) as err:
        run("v3")
    assert err.value.status_code == 409 and "'v3'" in str(err.value) and "'v1'" in str(err.value)
    assert weights(url)["version"] == "v1"  # prepared, not served


def test_prepared_state_expires_is_replaced_and_is_freed_by_an_abort(at_v1):
    url = at_v1[0]
    assert post(url, "/v1/weights/prepare", version="v2", ttl_s=0.5).status_code == 200
    assert weights(url)["prepared"]["version"] == "v2"
    threading.Event().wait(0.8)
    assert (weights(url)["prepared"], weights(url)["spare"]) == (None, None)
    assert ask(url, weight_version="v2").status_code == 409
    assert post(url, "/v1/weights/commit", version="v2").status_code == 409  # nothing prepared any more

    post(url, "/v1/weights/prepare", version="v2")
    post(url, "/v1/weights/prepare", version="v3")  # replaces v2
    assert (weights(url)["prepared"]["version"], weights(url)["spare"]) == ("v3", "v3")
    assert ask(url, weight_version="v2").status_code == 409
    assert post(url, "/v1/weights/abort").json()["aborted"] == "v3"
    assert (weights(url)["prepared"], weights(url)["spare"]) == (None, None)
    assert ask(url, weight_version="v3").status_code == 409
    committed = post(url, "/v1/weights/commit", version="v3")
    assert committed.status_code == 409 and "prepare it first" in committed.json()["message"]
    assert weights(url)["version"] == "v1"

    post(url, "/v1/weights/prepare", version="v2")
    assert post(url, "/v1/update_weights", version="v2").json()["digest"] == digest_of(state(2))  # takes the spare
    assert (weights(url)["version"], weights(url)["prepared"], weights(url)["spare"]) == ("v2", None, "v1")
    assert ask(url).json()["choices"][0]["text"] == offline_text(2)


def test_an_in_place_server_goes_back_from_a_delta_by_reapplying_it(tmp_path):
    """The delta's XOR applied again gives the base's exact bytes (its manifest digest), read from the delta's
    files only."""
    root = str(tmp_path / "snap")
    base = state(1)
    step = {k: v.copy() for k, v in base.items()}
    name = sorted(step)[2]
    step[name].reshape(-1)[:7] += np.float32(0.5)
    cache = storage.LastPublished()
    storage.publish(base, root, "b1", cache=cache)
    assert storage.publish(step, root, "d2", base="b1", cache=cache).kind == "delta"
    with baton_serve(root, "--version", "b1", "--swap", "in_place") as url:
        rows = sync_weights("d2", root, [str(url)])
        assert rows[0]["prepared"] == "checked" and rows[0]["guarantee"].startswith("per server")
        assert (weights(url)["load_path"], weights(url)["digest"]) == ("delta", digest_of(step))
        back = post(url, "/v1/update_weights", version="b1").json()
        assert (back["load_path"], back["digest"]) == ("delta reversed", digest_of(base))
        assert ask(str(url)).json()["choices"][0]["text"] == offline_text(1)


def test_a_server_holding_two_ranks_takes_a_delta_and_goes_back(tmp_path):
    """Replicated tensors (the norms) sit in both ranks' views of one model: each rank's delta changes them once."""
    from infer.weights import WeightManager

    root = str(tmp_path / "snap")
    base = state(1)
    step = {k: v.copy() for k, v in base.items()}
    for name in step:  # every tensor moves, the replicated norms too
        step[name].reshape(-1)[:5] += np.float32(0.25)
    cache = storage.LastPublished()
    for rank, shard in enumerate(storage.split_state_dict(base, 2)):
        storage.publish(shard, root, "b1", rank, cache=cache)
    for rank, shard in enumerate(storage.split_state_dict(step, 2)):
        assert storage.publish(shard, root, "d2", rank, base="b1", cache=cache).kind == "delta"
    for mode in ("in_place", "double_buffer"):
        manager = WeightManager(CONFIG, root, tp_size=2, mode=mode)
        manager.update("b1")
        info = manager.update("d2")
        assert (info.path, info.digest) == ("delta", digest_of(step)), mode
        assert manager.update("b1").digest == digest_of(base), mode
