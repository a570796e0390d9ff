"""A Prefect API that outlives one command, so that ``baton sync`` costs what the sync costs.

A command that starts a temporary Prefect server pays its start-up every time (importing the server, opening and
checking the database, starting its services): seconds, beside a sync whose work takes milliseconds. Prefect users
point their commands at a running server with ``PREFECT_API_URL``; where they have not, Baton keeps one for them.
``use_local_prefect`` decides which, before the first flow runs:

- Prefect already points at a server (``PREFECT_API_URL``, a profile, ``prefect_test_harness``): that one is used
  and nothing is started.
- Otherwise Baton's local server for one home (``$BATON_HOME/prefect``, default ``~/.baton/prefect``), the app of
  ``flows.local`` kept running: the first command starts it detached (its own session, its output in
  ``server.log``) and records its URL and pid in ``server.json``; later commands find it there. The database is
  created and migrated once, by that first start. A file lock makes commands that start together share one server.

Nothing is left running for ever, and nothing needs a supervisor: the server stops itself after
``BATON_PREFECT_IDLE_S`` seconds (default 1800) without a request or an open connection; ``baton prefect status``
shows it and ``baton prefect stop`` stops it at once. A server is known by asking it (``GET /baton/server`` answers
its pid and home), never by a pid read from a file, so a stale file or a reused pid is never signalled. This is
simpler than a daemon with a socket of its own, and it needs no change to Prefect: the process is Prefect's API
app, and any Prefect client (``PREFECT_API_URL=$(baton prefect status --url) prefect flow-run ls``) reads its
records.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flows.local import _Steady, free_port, server_command, server_env

IDLE_S = 1800.0
STATE_FILE, LOCK_FILE, LOG_FILE = "server.json", "server.lock", "server.log"


@dataclass(frozen=True)
class LocalServer:
    url: str  # Prefect's API URL, http://127.0.0.1:PORT/api
    pid: int
    home: Path
    idle_s: float  # it stops itself after this many seconds without a request
    started: bool = False  # whether the call that returned it started it


def home_dir() -> Path:
    """``$BATON_HOME/prefect``, by default ``~/.baton/prefect``: the reused server's ``PREFECT_HOME``."""
    return Path(os.environ.get("BATON_HOME") or Path.home() / ".baton").expanduser() / "prefect"


def idle_seconds() -> float:
    return float(os.environ.get("BATON_PREFECT_IDLE_S") or IDLE_S)


def use_local_prefect(home: Path | None = None) -> tuple[str, LocalServer | None]:
    """Points this process's Prefect at the API it should record in; returns the API URL, and Baton's server when
    it is the one used (started now when none was running). Call before the first flow runs."""
    configured = os.environ.get("PREFECT_API_URL")
    if not configured:
        from prefect.settings import get_current_settings  # reads profiles and prefect.toml as Prefect does

        configured = get_current_settings().api.url
    if configured:
        return configured, None
    server = ensure(home)
    os.environ["PREFECT_API_URL"] = server.url  # for this process and any it starts
    # Prefect read its settings when it was imported; this is how it takes environment variables set afterwards
    # (``prefect/context.py`` ``refresh_global_settings_context``, which ``prefect/__init__.py`` calls after plugins).
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    return server.url, server


def find(home: Path | None = None) -> LocalServer | None:
    """Baton's running server for ``home``, or None: the one ``server.json`` names, if it answers as that server."""
    home = Path(home or home_dir()).resolve()
    try:
        recorded = json.loads((home / STATE_FILE).read_text())
        root = recorded["url"].removesuffix("/api")
        with urllib.request.urlopen(root + _Steady.IDENTITY_PATH, timeout=5) as reply:
            identity = json.load(reply)
    except (OSError, ValueError, KeyError):  # no file, no answer, or not a Baton server
        return None
    if identity.get("home") != str(home) or identity.get("pid") != recorded.get("pid"):
        return None
    return LocalServer(recorded["url"], int(recorded["pid"]), home, float(recorded.get("idle_s", IDLE_S)))


def ensure(home: Path | None = None, idle_s: float | None = None, timeout: float | None = None) -> LocalServer:
    """Baton's running server for ``home``; starts one first when none answers. Raises ``RuntimeError`` with the
    server's log when it exits or does not answer within ``timeout`` seconds."""
    home = Path(home or home_dir()).resolve()
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home):
        if (found := find(home)) is not None:
            return found
        return _start(home, idle_seconds() if idle_s is None else idle_s, timeout)


def stop(home: Path | None = None, grace: float = 30.0) -> LocalServer | None:
    """Stops Baton's server for ``home`` (SIGTERM: Prefect's services write what they hold; SIGKILL after
    ``grace`` seconds) and returns it; None when none was running."""
    home = Path(home or home_dir()).resolve()
    with _locked(home):
        server = find(home)
        if server is None:
            return None
        os.kill(server.pid, signal.SIGTERM)
        if not _wait_gone(server.pid, grace):
            os.kill(server.pid, signal.SIGKILL)
            _wait_gone(server.pid, grace)
        (home / STATE_FILE).unlink(missing_ok=True)
        return server


def _start(home: Path, idle_s: float, timeout: float | None) -> LocalServer:
    port = free_port()
    with (home / LOG_FILE).open("ab") as log:
        proc = subprocess.Popen(server_command(port, idle_s), env=server_env(home), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = LocalServer(f"http://127.0.0.1:{port}/api", proc.pid, home, idle_s, started=True)
    (home / STATE_FILE).write_text(json.dumps({"url": server.url, "pid": server.pid, "idle_s": idle_s}))
    timeout = timeout or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 180)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Baton's Prefect server for {home} exited with code {proc.returncode} before it "
                               f"answered; its log ({home / LOG_FILE}) ends:\n{_tail(home / LOG_FILE)}")
        if find(home) is not None:  # uvicorn answers once the app's start-up (migrations, services) is done
            return server
        time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"Baton's Prefect server for {home} did not answer at {server.url} within {timeout:.0f} s; "
                       f"its log ({home / LOG_FILE}) ends:\n{_tail(home / LOG_FILE)}")


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Holds ``home/server.lock`` (an advisory lock the system drops when the holder dies)."""
    with (home / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _wait_gone(pid: int, seconds: float) -> bool:
    """Whether ``pid`` exited within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaps it when this process started it
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: an exited process that nobody reaped yet (a zombie, where the system's init does not
    reap) counts as exited."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc: os.kill's answer stands
        return True


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


def main(action: str, home: Path | None = None, url_only: bool = False) -> int:
    """``baton prefect start | status | stop``."""
    home = Path(home or home_dir())
    if action == "start":
        server = ensure(home)
    elif action == "stop":
        server = stop(home)
        print(f"stopped Baton's Prefect server (pid {server.pid}, {server.url})" if server else
              f"no Baton Prefect server running for {home}")
        return 0
    else:
        server = find(home)
    if server is None:
        print(f"no Baton Prefect server running for {home}", file=sys.stderr)
        return 1
    print(server.url if url_only else describe(server))
    return 0


def describe(server: LocalServer) -> str:
    return (f"Baton's Prefect server at {server.url} (pid {server.pid}, home {server.home}; it stops after "
            f"{server.idle_s:.0f} s without a request, or at `baton prefect stop`)")
