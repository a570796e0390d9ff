"""The processes the scenarios start, kill and start again: a loopback S3 server (moto), a Prefect server, the
publisher zygote, and the helper programs of this package (run with ``python -m harness.chaos.<name>``)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import storage
from harness.launch import free_port, wait_until

BUCKET = "baton-chaos"
# The directory that holds the ``harness`` package. Programs start there: ``python -m`` puts the working directory
# first on their path, so they import this copy of the repository whether it is installed or run from its root.
IMPORT_ROOT = Path(__file__).resolve().parents[2]


def start_program(name: str, *args: str, **popen) -> subprocess.Popen:
    """Starts this package's module ``name`` (``zygote``, ``racer``, ``rewriter``, ``sync``) as a program."""
    return subprocess.Popen([sys.executable, "-m", f"{__package__}.{name}", *args], cwd=IMPORT_ROOT, **popen)


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended and been reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Child:
    """A server a scenario started: killed (SIGKILL, the fault) or stopped (SIGTERM, then SIGKILL)."""

    proc: subprocess.Popen | None = None

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class MotoS3(Child):
    """moto's S3 server in its own process on a fixed port, so a SIGKILL really takes storage away and a restart
    brings it back at the same endpoint (empty: moto keeps objects in memory)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "BATON_S3_ENDPOINT": self.endpoint}

    def start(self) -> MotoS3:
        import urllib.request

        os.environ.update(self.env())
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: urllib.request.urlopen(self.endpoint, timeout=2).status == 200, 60, "moto S3 server")
        fs, _ = storage.open_fs(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        return self


@contextlib.contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """The server, with the environment that points storage at it put back as it was afterwards."""
    s3 = MotoS3()
    with mock.patch.dict(os.environ):  # start() points the environment at it
        try:
            yield s3.start()
        finally:
            s3.stop()


class PrefectServer(Child):
    """``prefect server start`` on 127.0.0.1 with its database in ``home``: killed and started again at the same
    address it finds its records where it left them."""

    def __init__(self, home: Path):
        self.home, self.port, self.proc = home, free_port(), None

    def env(self) -> dict[str, str]:
        return {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": f"http://127.0.0.1:{self.port}/api",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": "INFO"}

    def start(self) -> PrefectServer:
        import urllib.request

        prefect = str(Path(sys.executable).parent / "prefect")
        with (self.home / "server.log").open("a") as log_file:  # the server writes to its own copy
            self.proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port",
                                          str(self.port)], stdout=log_file, stderr=subprocess.STDOUT, env=self.env())
        wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2).status == 200,
                   180, "prefect server", 0.2)
        return self


@contextlib.contextmanager
def publisher_zygote() -> Iterator[Callable[[str, int, int, int], int]]:
    """``spawn(root, first, scale, part_bytes) -> pid`` of a fresh publisher process (``harness.chaos.zygote``
    forks one per request: each killed publisher is a real process, without a Python start-up per kill)."""
    proc = start_program("zygote", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def spawn(root: str, first: int, scale: int, part: int) -> int:
        proc.stdin.write(f"{root} {first} {scale} {part}\n")
        proc.stdin.flush()
        if not select.select([proc.stdout], [], [], 60)[0]:
            raise RuntimeError(f"no publisher started for {root}")
        _, pid = proc.stdout.readline().split()  # the child's "started PID"
        return int(pid)

    try:
        yield spawn
    finally:
        proc.stdin.close()
        proc.wait(30)


@contextlib.contextmanager
def racing(name: str, *args: str) -> Iterator[subprocess.Popen]:
    """Program ``name`` racing the loads; SIGKILLed at the end (it may be mid-write, as a fault would leave it)."""
    proc = start_program(name, *args, stdout=subprocess.PIPE, text=True)
    try:
        proc.stdout.readline()  # its first write is done: there is something to race
        yield proc
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
