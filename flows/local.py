"""Prefect's API app, served by Baton on this machine: for one process (``use_temporary_prefect``, what the demo,
the tests and the benchmarks use) or kept for later commands (``flows.home``, what ``baton sync`` uses).

It is the app Prefect's own temporary server runs (``prefect/server/api/server.py``
``SubprocessASGIServer._run_uvicorn_command``: uvicorn serving ``create_app`` with SQLite under ``PREFECT_HOME``),
wrapped in ``_Steady`` for two stalls that no Prefect setting reaches:

- SQLite refuses ``POST /api/flow_runs/`` when another writer (the server's event persister,
  ``prefect/server/events/services/event_persister.py``) committed since the request's deferred transaction read
  (``prefect/server/api/flow_runs.py`` ``session_context(begin_transaction=True)``;
  ``prefect/server/database/configurations.py`` ``BEGIN DEFERRED``). The server counts "database is locked" as
  retryable and answers 503 without ``Retry-After`` (``prefect/server/api/server.py``), and Prefect's client waits
  two seconds before asking again (``prefect/client/base.py``). ``_Steady`` runs such a request again in the server
  after a few milliseconds, as the client's retry would run it: the failed transaction rolled back.
- A full garbage collection in the server scans every object built at start-up; ``_Steady`` freezes them
  (``gc.freeze``) once the app is up.

Flow runs, task runs, states, artifacts, events and logs are Prefect's, recorded in ``PREFECT_HOME``.
``BATON_TEMPORARY_PREFECT=prefect`` (or ``server="prefect"``) gives Prefect's own temporary server back.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
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
    port = free_port()
    _server, _url, _home, _up = (subprocess.Popen(server_command(port), env=server_env(home)),
                                 f"http://127.0.0.1:{port}/api", home, False)
    atexit.unregister(_stop)
    atexit.register(_stop)
    return _url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(home: str | Path) -> dict[str, str]:
    """The environment of a server process for ``home``: Prefect's flags for its temporary server (no UI)."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1"}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.pop("PREFECT_API_URL", None)
    return env


def server_command(port: int, idle_s: float | None = None) -> list[str]:
    """The command line of a server process (``serve(port, idle_s)``), importing this checkout's ``flows``."""
    code = f"import sys; sys.path.insert(0, {str(_REPO)!r}); from flows.local import serve; serve({port}, {idle_s!r})"
    return [sys.executable, "-c", code]


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


def serve(port: int, idle_s: float | None = None) -> None:
    """The server process: Prefect's API app (``create_app`` as uvicorn's factory calls it for Prefect's temporary
    server), wrapped in ``_Steady``. Without ``idle_s`` it is a temporary server: it stops when its parent exits
    (a trainer killed before it could stop it). With ``idle_s`` it outlives the command that started it and stops
    after ``idle_s`` seconds without a request (``flows.home``)."""
    import uvicorn
    from prefect.server.api.server import create_app

    app = _Steady(create_app(), identity={"pid": os.getpid(), "home": str(Path(os.environ["PREFECT_HOME"]).resolve())})
    parent = os.getppid()

    def done() -> bool:
        return os.getppid() != parent if idle_s is None else app.idle_for() > idle_s

    def stop_when_done() -> None:
        while not done():
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown: the services write what they hold

    threading.Thread(target=stop_when_done, daemon=True).start()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", lifespan="on")


class _Steady:
    """ASGI wrapper of Prefect's API app: freezes the start-up heap, and runs a request that got a retryable 503
    again after a short wait (see the module docstring). It also answers ``GET /baton/server`` with ``identity``
    (its pid and home, so that ``flows.home`` signals only a server it started) and counts open connections, so
    that an idle server can stop itself."""

    RETRY_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64)  # 1.27 s in all; then the 503 goes to the client
    IDENTITY_PATH = "/baton/server"

    def __init__(self, app: Any, identity: dict[str, Any] | None = None):
        self.app, self.identity = app, identity
        self._in_flight, self._last = 0, None  # no idle time counts before the app has started

    def idle_for(self) -> float:
        """Seconds since the last request ended (or the app started); 0 while one is in flight."""
        return 0.0 if self._in_flight or self._last is None else time.monotonic() - self._last

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            async def send_frozen(message: dict) -> None:
                if message["type"] == "lifespan.startup.complete":
                    gc.collect()
                    gc.freeze()  # what start-up built is never scanned again
                    self._last = time.monotonic()
                await send(message)

            return await self.app(scope, receive, send_frozen)
        self._in_flight += 1  # a request, or a websocket (Prefect's events client) while it is open
        try:
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            if self.identity is not None and scope.get("path") == self.IDENTITY_PATH:
                return await _answer_json(send, self.identity)
            return await self._retrying(scope, receive, send)
        finally:
            self._in_flight -= 1
            self._last = time.monotonic()

    async def _retrying(self, scope: dict, receive, send) -> None:
        request = []  # the request's messages, to give the app again
        while True:
            message = await receive()
            request.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        for delay in (*self.RETRY_S, None):
            async def receive_again(given=iter(request)) -> dict:  # noqa: B008 - a fresh iterator for each try
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


async def _answer_json(send, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
