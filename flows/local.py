"""Running the flows on one machine without a Prefect server: Baton's temporary local Prefect API.

Prefect, given no ``PREFECT_API_URL``, starts a temporary API server of its own on first use
(``prefect/server/api/server.py:1179`` ``SubprocessASGIServer._run_uvicorn_command``: uvicorn serving
``prefect.server.api.server:create_app`` with SQLite under ``PREFECT_HOME``). A trainer that syncs after every step
measured ~0.2 s a sync with it, and two kinds of stall on top (``bench/sync_tail.py`` runs the demo and measures
them):

1. ~2 s, now and then: Prefect's client waiting out a 503 that SQLite's "database is locked" became. Each sync
   creates a flow run; ``POST /api/flow_runs/`` opens a deferred transaction (``prefect/server/api/flow_runs.py:153``
   ``session_context(begin_transaction=True)``, ``BEGIN DEFERRED`` at ``prefect/server/database/configurations.py:610``)
   that reads before it writes (``prefect/server/models/flow_runs.py:83`` -> ``:730`` reads the flow's labels,
   ``:103`` inserts the run). SQLite cannot upgrade a transaction that has read to a write while another connection
   is writing or has committed since, so it fails at once without using the 60 s ``busy_timeout``
   (``configurations.py:576``). The other writer is the same server's event persister, which writes the events it
   queued every 5 s (``prefect/server/events/services/event_persister.py:151``; the task-run recorder writes on each
   task-run event). ``prefect/server/api/server.py:320`` counts the error as retryable and answers 503 (``:410``)
   with no ``Retry-After``, so ``prefect/client/base.py:344`` waits ``2**1`` s (with jitter) before asking again.
   Measured with a flow run every 0.15 s: the 503 came back 5.0 s apart, each on ``INSERT INTO flow_run``. Prefect
   fixed the same pattern elsewhere by starting such transactions ``BEGIN IMMEDIATE``
   (``prefect/server/models/deployments.py:1299``, ``prefect/server/events/triggers.py:618``); no setting reaches
   this one. ``PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE=1`` (write each event when it arrives) made it
   worse: 27 stalls in 300 back-to-back runs against 2.
2. ~0.35 s, about once a minute: a full garbage collection in the server process, whose ~590,000 objects after
   start-up are all scanned each time (a gen-2 collection measured 0.18-0.38 s, and the request waiting on it
   took that much longer). No Prefect setting reaches the server's collector.

So Baton starts the same server itself, with two changes made outside Prefect's code, in an ASGI wrapper
(``_Steady``): the objects alive after start-up are frozen (``gc.freeze``), so a full collection scans only what
came after (measured 3-50 ms); and a request that gets the retryable 503 is run again in the server after 10 ms,
then 20, 40, ... 640 ms, before the 503 goes to the client and Prefect's own retries. The request runs again
exactly as the client's retry would run it: the failed transaction rolled back. Flow runs, task runs, states,
artifacts, events and logs are Prefect's, recorded in ``PREFECT_HOME`` as before. ``BATON_TEMPORARY_PREFECT=prefect``
(or ``server="prefect"``) gives Prefect's own temporary server back.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Literal

_REPO = Path(__file__).resolve().parent.parent
_server: subprocess.Popen | None = None
_url: str | None = None
_home: str | None = None  # the PREFECT_HOME it serves
_up = False


def use_temporary_prefect(home: str | Path, server: Literal["baton", "prefect"] | None = None) -> None:
    """Point Prefect at a temporary local API whose records live in ``home``. Call before Prefect is imported:
    it reads these settings once. ``server="baton"`` (the default, or ``BATON_TEMPORARY_PREFECT``) starts Baton's
    temporary server now (see the module docstring) and the first Baton flow call waits until it answers;
    ``"prefect"`` leaves it to Prefect, which starts its own on first use."""
    server = server or os.environ.get("BATON_TEMPORARY_PREFECT") or "baton"
    if server not in ("baton", "prefect"):
        raise ValueError(f"server must be 'baton' or 'prefect', not {server!r}")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.pop("PREFECT_API_URL", None)  # none configured: Prefect starts its own, unless Baton's is set below
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # cold start, 2 busy cores
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # the callers print what matters; the UI has more
    if server == "prefect":
        _stop()
    elif _server is not None and _server.poll() is None and _home == str(home):
        os.environ["PREFECT_API_URL"] = _url  # called again for the same home: the server already started
    else:
        _stop()
        Path(home).mkdir(parents=True, exist_ok=True)  # the server opens its database there at once
        os.environ["PREFECT_API_URL"] = _start(str(home))


def wait_until_up() -> None:
    """Returns once Baton's temporary server answers (at once when there is none, or it already did); raises if it
    exited or did not answer within ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``."""
    global _up
    if _up or _server is None:
        return
    timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _server.poll() is not None:
            raise RuntimeError(f"Baton's temporary Prefect server exited with code {_server.returncode} before it "
                               f"answered at {_url}")
        try:
            with urllib.request.urlopen(f"{_url}/health", timeout=5) as reply:
                if reply.status == 200:
                    _up = True
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"Baton's temporary Prefect server did not answer at {_url} within {timeout:.0f}s")


def _start(home: str) -> str:
    """Starts the server process on a free port of 127.0.0.1, as Prefect's own (same app and environment flags),
    and returns its API URL; it stops when this process exits."""
    global _server, _url, _home, _up
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    code = f"import sys; sys.path.insert(0, {str(_REPO)!r}); from flows.local import serve; serve({port})"
    _server, _url, _home, _up = (subprocess.Popen([sys.executable, "-c", code], env=env),
                                 f"http://127.0.0.1:{port}/api", home, False)
    atexit.unregister(_stop)
    atexit.register(_stop)
    return _url


def _stop() -> None:
    global _server, _url, _home, _up
    if _server is not None and _server.poll() is None:
        _server.terminate()  # uvicorn shuts down: the services write what they still hold
        try:
            _server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _server.kill()
            _server.wait()
    _server, _url, _home, _up = None, None, None, False


def serve(port: int) -> None:
    """The server process: Prefect's API app (``create_app`` as uvicorn's factory calls it for Prefect's temporary
    server), wrapped in ``_Steady``."""
    import uvicorn
    from prefect.server.api.server import create_app

    parent = os.getppid()

    def stop_when_orphaned() -> None:  # the trainer was killed before it could stop us
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown

    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    uvicorn.run(_Steady(create_app()), host="127.0.0.1", port=port, log_level="error", lifespan="on")


class _Steady:
    """ASGI wrapper of Prefect's API app: freezes the start-up heap, and runs a request that got a retryable 503
    again after a short wait (see the module docstring)."""

    RETRY_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)  # 1.27 s in all; then the 503 goes to the client

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            async def send_frozen(message: dict) -> None:
                if message["type"] == "lifespan.startup.complete":
                    gc.collect()
                    gc.freeze()  # what start-up built is never scanned again
                await send(message)

            return await self.app(scope, receive, send_frozen)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = []  # the request's messages, to give the app again
        while True:
            message = await receive()
            request.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        for delay in (*self.RETRY_S, None):
            async def receive_again(given=iter(request)) -> dict:
                return next(given, None) or await receive()

            if delay is None:  # the last try: whatever it answers goes to the client
                return await self.app(dict(scope), receive_again, send)
            status = None

            async def send_unless_busy(message: dict) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                if status != 503:
                    await send(message)

            try:
                await self.app(dict(scope), receive_again, send_unless_busy)  # routing writes to its scope
            except Exception:
                if status != 503:  # Starlette re-raises what its handler answered; only the 503 is ours to retry
                    raise
            if status != 503:
                return
            await asyncio.sleep(delay)
