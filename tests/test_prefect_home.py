"""``baton sync`` records its runs in a Prefect server that outlives the command (``flows.home``): started once, found
and reused by later commands, left alone when ``PREFECT_API_URL`` names another, stopped by ``baton prefect stop`` or
by itself when idle. Real commands, real servers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import storage
from flows import home as prefect_home
from harness.launch import baton_serve
from infer.config import get_config
from infer.model import random_state_dict

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    snap = str(tmp_path_factory.mktemp("snap"))
    for i in (1, 2, 3):
        storage.publish(random_state_dict(get_config("tiny"), seed=i), snap, f"v{i}")
    with baton_serve(snap, "--model", "tiny") as server:
        yield snap, server.url


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "BATON_HOME"}
    return {**env, "BATON_HOME": str(tmp_path / "baton"), "PREFECT_HOME": str(tmp_path / "client"),
            "PYTHONWARNINGS": "ignore", **extra}


def baton(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """A command from a fresh process; ``capture_output`` also proves a server it leaves running does not hold its
    output open (the call would not return)."""
    return subprocess.run([sys.executable, "-m", "baton_cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def sync(env: dict[str, str], snap: str, url: str, version: str) -> subprocess.CompletedProcess:
    done = baton(env, "sync", version, "--snapshot-root", snap, "--server", url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{url}: live {version}" in done.stdout
    return done


def wait_for(check, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while (value := check()) is None or value is False:
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {seconds} s: {check}")
        time.sleep(0.2)
    return value


def test_sync_starts_one_server_later_commands_reuse_it_and_stop_stops_it(tmp_path, tiny_server):
    snap, url = tiny_server
    env, home = env_for(tmp_path), tmp_path / "baton" / "prefect"
    try:
        first = sync(env, snap, url, "v1")
        assert "started Baton's Prefect server" in first.stderr
        server = prefect_home.find(home)
        assert server is not None and not server.started
        status = baton(env, "prefect", "status", "--url")
        assert status.returncode == 0 and status.stdout.strip() == server.url

        second = sync(env, snap, url, "v2")
        assert "started" not in second.stderr
        assert prefect_home.find(home) == server

        api = server.url
        runs = httpx.post(f"{api}/flow_runs/filter", json={}).raise_for_status().json()
        assert sorted(r["state_type"] for r in runs) == ["COMPLETED", "COMPLETED"]
        keys = {a["key"] for a in httpx.post(f"{api}/artifacts/filter", json={}).raise_for_status().json()}
        assert {"sync-v1", "sync-v2"} <= keys
        def live() -> list[str]:
            events = httpx.post(f"{api}/events/filter", json={"filter": {"event": {"name": ["baton.weights.live"]}}})
            return sorted(e["payload"]["version"] for e in events.raise_for_status().json()["events"])

        wait_for(lambda: len(live()) >= 2)  # the server writes the events it received in batches
        assert live() == ["v1", "v2"]

        stopped = baton(env, "prefect", "stop")
        assert stopped.returncode == 0 and f"pid {server.pid}" in stopped.stdout
        assert not prefect_home.alive(server.pid) and prefect_home.find(home) is None
        assert baton(env, "prefect", "status").returncode == 1
    finally:
        prefect_home.stop(home)


def test_a_configured_prefect_api_is_used_and_nothing_is_started(tmp_path, tiny_server):
    snap, url = tiny_server
    other = prefect_home.ensure(tmp_path / "running")  # any Prefect API the user runs
    try:
        env = env_for(tmp_path, PREFECT_API_URL=other.url)
        done = sync(env, snap, url, "v3")
        assert "started" not in done.stderr
        assert not (tmp_path / "baton").exists()
        runs = httpx.post(f"{other.url}/flow_runs/filter", json={}).raise_for_status().json()
        assert [r["state_type"] for r in runs] == ["COMPLETED"]
    finally:
        prefect_home.stop(tmp_path / "running")


def test_commands_that_start_together_share_one_server(tmp_path):
    env = env_for(tmp_path)
    try:
        with ThreadPoolExecutor(2) as pool:
            started = list(pool.map(lambda _: baton(env, "prefect", "start", "--url"), range(2)))
        assert [s.returncode for s in started] == [0, 0], [s.stderr for s in started]
        assert started[0].stdout == started[1].stdout
    finally:
        prefect_home.stop(tmp_path / "baton" / "prefect")


def test_an_idle_server_stops_itself(tmp_path):
    server = prefect_home.ensure(tmp_path / "idle", idle_s=1)
    assert server.started and server.idle_s == 1
    try:
        wait_for(lambda: prefect_home._wait_gone(server.pid, 1), 120)
        assert prefect_home.find(tmp_path / "idle") is None
    finally:
        prefect_home.stop(tmp_path / "idle")
