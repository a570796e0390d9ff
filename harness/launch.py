"""Start `baton serve` as a child process on a free port and stop it afterwards: for tests, benchmarks and the
demo, which need real servers over real HTTP."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerProcess:
    url: str  # http://127.0.0.1:PORT
    pid: int

    def __str__(self) -> str:
        return self.url


@contextlib.contextmanager
def baton_serve(root: str | None, *args: str, env: dict | None = None, ready: bool = True,
                timeout: float = 60) -> Iterator[ServerProcess]:
    """Starts ``baton serve --snapshot-root root --port 0 *args`` (no ``--snapshot-root`` when ``root`` is None);
    yields it (``str()`` is the URL) once it listens (and, with ``ready``, reports healthy). If it cannot start,
    the error carries the server's output."""
    where = ["--snapshot-root", root] if root is not None else []
    cmd = [sys.executable, "-m", "baton_cli", "serve", *where, "--port", "0", "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            output.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        url = _wait_for_url(proc, lines, timeout)
        if url is None:
            raise RuntimeError(f"baton serve did not start (exit {proc.poll()}):\n{''.join(output)}")
        if ready:
            _wait_healthy(url, timeout)
        yield ServerProcess(url, proc.pid)
    finally:
        stop(proc)


@contextlib.contextmanager
def logged_process(cmd: list[str], env: dict, log_path: Path) -> Iterator[subprocess.Popen]:
    """Any other command (``prefect server start``, ``baton deploy``), its output in ``log_path``, stopped after."""
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc
        finally:
            stop(proc, grace=20)


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM (uvicorn finishes open requests), then SIGKILL after ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_for_url(proc: subprocess.Popen, lines: queue.Queue, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                return None
            continue
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return m.group(1)
    return None


def _wait_healthy(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):  # refused, or 503 (an HTTPError) while it loads
            with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy in {timeout}s")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A port nothing listens on (bound, then released), for servers that must come back at the same address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(interval)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s")
