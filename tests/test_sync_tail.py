"""Baton's temporary Prefect server (``flows.local``): where Prefect is pointed, the retry of a request SQLite
refused, the frozen start-up heap, and one flow recorded through it."""

import asyncio
import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from flows.local import _Steady

REPO = Path(__file__).resolve().parent.parent


class Busy:
    """An ASGI app that answers 503 ``busy`` times and then 201 with the body it read. Like Starlette under FastAPI's
    handler for ``Exception``, it re-raises after answering 503; like ``Mount``, it writes to its scope."""

    def __init__(self, busy: int):
        self.busy, self.calls, self.bodies = busy, 0, []

    async def __call__(self, scope, receive, send):
        assert scope["root_path"] == ""  # each try gets the scope as it came
        scope["root_path"] = "/api"
        self.calls += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        if self.calls <= self.busy:
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b'{"exception_message": "Service Unavailable"}'})
            raise RuntimeError("database is locked")
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": body})


def call(app, busy_retries=(0.001,) * 7):
    steady = _Steady(app)
    steady.RETRY_S = busy_retries
    parts = [{"type": "http.request", "body": b'{"flow_id":', "more_body": True},
             {"type": "http.request", "body": b' "x"}', "more_body": False}]
    sent, error = [], None

    async def receive():
        return parts.pop(0) if parts else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    try:
        asyncio.run(steady({"type": "http", "root_path": "", "path": "/api/flow_runs/"}, receive, send))
    except RuntimeError as exc:
        error = exc
    return sent, error


def test_a_request_sqlite_refused_runs_again_in_the_server_and_the_client_sees_only_the_answer():
    app = Busy(busy=3)
    sent, error = call(app)
    assert error is None and app.calls == 4
    assert app.bodies == [b'{"flow_id": "x"}'] * 4  # the same request each time
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [201]
    assert sent[-1]["body"] == b'{"flow_id": "x"}'


def test_a_503_that_lasts_goes_to_the_client_as_before():
    app = Busy(busy=100)
    sent, error = call(app, busy_retries=(0.001, 0.001))
    assert app.calls == 3  # two tries in the server, then the client's own retries take over
    assert [m.get("status") for m in sent if m["type"] == "http.response.start"] == [503]
    assert str(error) == "database is locked"


def test_the_heap_built_at_start_up_is_frozen_once_the_app_is_ready():
    async def lifespan(scope, receive, send):
        await receive()
        await send({"type": "lifespan.startup.complete"})

    events = [{"type": "lifespan.startup"}]

    async def receive():
        return events.pop(0)

    async def send(message):
        frozen.append(gc.get_freeze_count())

    frozen: list[int] = []
    before = gc.get_freeze_count()
    try:
        asyncio.run(_Steady(lifespan)({"type": "lifespan"}, receive, send))
        assert frozen[0] > before + 10_000  # the interpreter and what the tests imported
    finally:
        gc.unfreeze()


def run_python(code: str, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "BATON_TEMPORARY_PREFECT")}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, env={**env, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prefect_reads_batons_server_and_a_flow_run_is_recorded_in_its_home(tmp_path):
    got = run_python(f"""
        import json
        from pathlib import Path
        from flows.local import use_temporary_prefect
        use_temporary_prefect({str(tmp_path / "home")!r})
        import prefect.settings as s
        from prefect import get_client, task
        from flows.inprocess import flow

        @task
        def double(x):
            return 2 * x

        @flow(name="tail-check")
        def check(x):
            return double.submit(x).result()

        settings = s.get_current_settings()
        answer = check(21)
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
        print(json.dumps({{"api": str(settings.api.url), "home": str(settings.home), "answer": answer,
                          "runs": [(r.name and r.state.name) for r in runs],
                          "db": Path(settings.home, "prefect.db").exists()}}))
    """, timeout=120)
    assert got["api"].startswith("http://127.0.0.1:") and got["api"].endswith("/api")
    assert got["home"] == str(tmp_path / "home") and got["db"]
    assert got["answer"] == 42 and got["runs"] == ["Completed"]


def test_prefects_own_temporary_server_is_still_one_setting_away(tmp_path):
    got = run_python(f"""
        import json
        from flows.local import use_temporary_prefect
        use_temporary_prefect({str(tmp_path / "home")!r}, server="prefect")
        import prefect.settings as s
        print(json.dumps({{"api": s.get_current_settings().api.url}}))
    """, timeout=60)
    assert got["api"] is None  # Prefect starts its own on first use, as before
