"""Hardening of the inference server over real HTTP: requests beyond the context, one error body for every
4xx/5xx, unknown and unsupported fields, every request counted in /metrics, and the start-up load apart from
updates."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from harness.launch import baton_serve
from tests.test_server import CONFIG, PROMPT, corrupt_later_part, publish_versions

TOKEN = {"Authorization": "Bearer s3cret"}
LIMIT = CONFIG.max_seq_len  # 256 tokens for tiny; a prompt is BOS + its UTF-8 bytes


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """One guarded server that started on v2, after skipping the corrupt newest version."""
    root = tmp_path_factory.mktemp("errors")
    publish_versions(root)
    corrupt_later_part(root, "v3-corrupt")
    with baton_serve(str(root), "--admin-token-env", "BATON_TEST_TOKEN", env={"BATON_TEST_TOKEN": "s3cret"}) as srv:
        yield str(srv)


def post(url: str, path: str = "/v1/completions", headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", headers=headers, timeout=60, **kwargs)


def metric(url: str, series: str) -> float:
    """The value of one series in /metrics (0 while it has none)."""
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


REQUESTS = 'baton_completion_requests_total{status="%s"}'
UPDATES = 'baton_weight_updates_total{outcome="%s"}'
STARTUP = 'baton_weight_startup_loads_total{outcome="%s"}'


def openai_error(r: httpx.Response, status: int, *mentions: str, kind: str = "invalid_request_error") -> dict:
    """Asserts OpenAI's error body (exactly message, type, code) and that its message mentions each string."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"message", "type", "code"}, body
    assert body["error"]["type"] == kind and body["error"]["code"] == status, body
    message = body["error"]["message"]
    assert "Traceback" not in message and 'File "' not in message, message
    for m in mentions:
        assert m in message, (m, message)
    return body


def completion_error(r: httpx.Response, status: int, *mentions: str, kind: str = "invalid_request_error") -> str:
    body = openai_error(r, status, *mentions, kind=kind)
    assert set(body) == {"error"}, body
    return body["error"]["message"]


def update_error(r: httpx.Response, status: int, *mentions: str, kind: str = "invalid_request_error") -> dict:
    """An update's failure keeps SGLang's keys (what flows/fleet.py reads) and adds OpenAI's error object."""
    body = openai_error(r, status, *mentions, kind=kind)
    assert set(body) == {"success", "message", "version", "source_level", "seconds", "bytes", "error"}, body
    assert body["success"] is False and body["message"] == body["error"]["message"] and body["version"] == "v2"
    return body


# ---- 1. max_tokens beyond the context ---------------------------------------------------------------------------

def test_max_tokens_beyond_the_context_is_a_400_naming_max_tokens_and_the_limit(url):
    generated, refused = metric(url, "baton:generation_tokens_total"), metric(url, REQUESTS % 400)
    prompt_tokens = len(PROMPT.encode()) + 1
    message = completion_error(post(url, json={"prompt": PROMPT, "max_tokens": 10**9}), 400, "max_tokens",
                               f"maximum context length is {LIMIT} tokens", f"requested {10**9 + prompt_tokens}")
    assert f"{prompt_tokens} in the prompt" in message
    # every prompt of a batch: the second one is too long for its max_tokens
    completion_error(post(url, json={"prompt": ["a", "x" * 250], "max_tokens": 10}), 400, "max_tokens",
                     "prompt 1", str(LIMIT))
    # echo counts the prompt once: a full context with nothing to generate is fine, one token more is not
    full = {"prompt": "x" * (LIMIT - 1), "max_tokens": 0, "echo": True, "logprobs": 0}
    assert post(url, json=full).status_code == 200
    completion_error(post(url, json={"prompt": "x" * (LIMIT - 1), "max_tokens": 1, "echo": True}), 400, "max_tokens")
    completion_error(post(url, json={"prompt": "x" * LIMIT, "max_tokens": 0, "echo": True}), 400, str(LIMIT))
    completion_error(post(url, json={"prompt": PROMPT, "max_tokens": 10**9, "stream": True}), 400, "max_tokens")
    assert metric(url, REQUESTS % 400) - refused == 5
    assert metric(url, "baton:generation_tokens_total") == generated  # refused before any work
    assert post(url, json={"prompt": PROMPT, "max_tokens": LIMIT - prompt_tokens}).status_code == 200


# ---- 2. one error body for every 4xx/5xx -----------------------------------------------------------------------

def test_every_error_has_openai_s_body(url):
    completion_error(post(url, content=b'{"prompt": ', headers={"Content-Type": "application/json"}), 400,
                     "not valid JSON")
    for not_an_object in ([1, 2], "text", 3):
        completion_error(post(url, json=not_an_object), 400, "JSON object")
    completion_error(post(url, content=b'{"prompt": "a"}'), 400, "Content-Type: application/json")
    completion_error(post(url, json={"prompt": PROMPT, "n": 65}), 400, "n: ")
    completion_error(post(url, json={"max_tokens": 2}), 400, "prompt")
    completion_error(post(url, json={"prompt": ""}), 400, "prompt")
    completion_error(post(url, content=b'{"prompt": "\\ud800"}', headers={"Content-Type": "application/json"}),
                     400, "prompt")  # valid JSON, not text
    completion_error(httpx.get(f"{url}/v1/nope"), 404, "GET /v1/nope")
    r = httpx.get(f"{url}/v1/completions")
    completion_error(r, 405, "GET /v1/completions", "POST")
    assert r.headers["allow"] == "POST"
    update_error(post(url, "/v1/update_weights", json={"version": "missing"}, headers=TOKEN), 400,
                 "No snapshot found")
    update_error(post(url, "/v1/update_weights", json={"version": "v1"}), 401, "admin token",
                 kind="authentication_error")
    update_error(post(url, "/v1/update_weights", json={"version": "v1"}, headers={"Authorization": "Bearer no"}), 403,
                 "admin token", kind="permission_error")
    update_error(post(url, "/v1/update_weights", json=["v1"], headers=TOKEN), 400, "JSON object")
    update_error(httpx.get(f"{url}/v1/update_weights"), 405, "GET /v1/update_weights")


class BrokenEngine:
    """An engine with a bug: what the client sees of an unhandled exception."""

    config = CONFIG

    def submit(self, prompts, params, sink, version=None):
        raise RuntimeError("secret internal detail at /srv/engine.py line 12")


@contextlib.contextmanager
def in_process(app):
    """A real uvicorn server over HTTP, in a thread of this process (to serve an app with a broken engine)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_an_unhandled_exception_is_a_500_with_the_error_body_and_no_traceback(tmp_path: Path):
    from infer.server import create_app
    from infer.weights import WeightManager

    with in_process(create_app(WeightManager(CONFIG, str(tmp_path)), BrokenEngine(), "baton-tiny")) as url:
        message = completion_error(post(url, json={"prompt": PROMPT}), 500, "RuntimeError", kind="server_error")
        assert "secret" not in message
        assert metric(url, REQUESTS % 500) == 1


# ---- 3. unknown and unsupported fields --------------------------------------------------------------------------

def test_unknown_fields_are_400s_that_name_them(url):
    completion_error(post(url, json={"prompt": PROMPT, "max_tokens": 2, "foo": 1}), 400, "unknown field 'foo'")
    message = completion_error(post(url, json={"prompt": PROMPT, "top_k": 5, "bar": None}), 400)
    assert "unknown field 'top_k'" in message and "unknown field 'bar'" in message
    update_error(post(url, "/v1/update_weights", json={"version": "v2", "model_path": "/x"}, headers=TOKEN), 400,
                 "unknown field 'model_path'")


def test_openai_fields_at_their_defaults_are_accepted_and_others_name_the_field(url):
    defaults = {"user": "rl-worker-3", "suffix": None, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0.0,
                "logit_bias": {}, "stream_options": None}
    r = post(url, json={"prompt": PROMPT, "max_tokens": 3, **defaults})
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) <= 3
    assert post(url, json={"prompt": PROMPT, "max_tokens": 2, "n": 2, "best_of": 2}).status_code == 200
    r = post(url, json={"prompt": PROMPT, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": False}})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model="baton-tiny", prompt=PROMPT, max_tokens=2, user="u", best_of=1,
                                      presence_penalty=0, frequency_penalty=0, logit_bias={})
    assert reply.choices[0].finish_reason in ("stop", "length")
    for field, value in (("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"65": 5}),
                         ("suffix", " the end"), ("best_of", 3), ("stream_options", {"include_usage": True})):
        completion_error(post(url, json={"prompt": PROMPT, field: value}), 400, f"{field}: ", "not supported")
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model="baton-tiny", prompt=PROMPT, max_tokens=2, presence_penalty=0.5)


# ---- 4. /metrics counts every request ---------------------------------------------------------------------------

def test_rejected_requests_are_counted_in_metrics(url):
    before = {s: metric(url, REQUESTS % s) for s in (400, 405)}
    post(url, json={"prompt": PROMPT, "foo": 1})
    post(url, content=b"{", headers={"Content-Type": "application/json"})
    post(url, json={"prompt": PROMPT, "max_tokens": 10**9})
    post(url, json={"prompt": PROMPT, "presence_penalty": 1})
    httpx.get(f"{url}/v1/completions")
    assert metric(url, REQUESTS % 400) - before[400] == 4
    assert metric(url, REQUESTS % 405) - before[405] == 1

    outcomes = ("unauthorized", "forbidden", "invalid_request", "bad_snapshot", "success")
    before = {o: metric(url, UPDATES % o) for o in outcomes}
    assert post(url, "/v1/update_weights", json={"version": "v1"}).status_code == 401
    assert post(url, "/v1/update_weights", json={"version": "v1"}, headers={"Authorization": "Bearer x"}).status_code \
        == 403
    assert post(url, "/v1/update_weights", json={"version": "v1", "foo": 1}, headers=TOKEN).status_code == 400
    assert post(url, "/v1/update_weights", json={}, headers=TOKEN).status_code == 400
    assert post(url, "/v1/update_weights", content=b"{", headers=TOKEN | {"Content-Type": "application/json"}) \
        .status_code == 400
    assert post(url, "/v1/update_weights", json={"version": "v1", "verify": "some"}, headers=TOKEN).status_code == 400
    after = {o: metric(url, UPDATES % o) for o in outcomes}
    assert {o: after[o] - before[o] for o in outcomes} == {"unauthorized": 1, "forbidden": 1, "invalid_request": 4,
                                                           "bad_snapshot": 0, "success": 0}


# ---- 5. the start-up load is not an update ----------------------------------------------------------------------

def test_the_start_up_load_is_counted_apart_from_updates(url):
    assert metric(url, STARTUP % "success") == 1  # v2
    assert metric(url, STARTUP % "bad_snapshot") == 1  # v3-corrupt, skipped at start
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert "# HELP baton_weight_updates_total Weight updates (POST /v1/update_weights)" in text
    updates, seconds = metric(url, UPDATES % "success"), metric(url, "baton_weight_update_seconds_count")
    assert updates == seconds  # the start-up load is in neither
    assert post(url, "/v1/update_weights", json={"version": "v2"}, headers=TOKEN).json()["success"] is True
    assert metric(url, UPDATES % "success") == updates + 1
    assert metric(url, "baton_weight_update_seconds_count") == seconds + 1
    assert metric(url, STARTUP % "success") == 1
