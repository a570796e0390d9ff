"""End to end, as a user runs it: a real `prefect server start`, `baton deploy`, an inference server, and
`prefect deployment run 'sync-weights/sync-weights'` from the command line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import paddle

from harness.launch import baton_serve
from harness.launch import logged_process as process
from infer.config import get_config
from infer.model import random_state_dict
from tests.conftest import free_port


def wait_for(check, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def test_prefect_deployment_run_sync_weights(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    state = {k: paddle.to_tensor(v) for k, v in random_state_dict(get_config("tiny"), 21).items()}
    paddle.save(state, str(ckpt / "model_state.pdparams"))
    snap = str(tmp_path / "snap")
    server_log, deploy_log = tmp_path / "server.log", tmp_path / "deploy.log"
    with process([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, server_log), \
            baton_serve(snap, ready=False) as inference:
        wait_for(lambda: httpx.get(f"{api}/health").status_code == 200, 120, "prefect server", server_log)
        with process([sys.executable, "-m", "baton_cli", "deploy"], env, deploy_log):
            wait_for(lambda: subprocess.run([prefect, "deployment", "inspect", "sync-weights/sync-weights"],
                                            env=env, capture_output=True).returncode == 0, 120, "baton deploy",
                     deploy_log)
            # two runs: sync-weights runs execute on threads of the warm `baton deploy` process, and the second
            # thread is the one that once got static-mode Paddle tensors
            for version in ("e2e", "e2e-2"):
                run = subprocess.run(
                    [prefect, "deployment", "run", "sync-weights/sync-weights", "-p", f"version={version}",
                     "-p", f"snapshot_root={snap}", "-p", f"servers={json.dumps([str(inference)])}",
                     "-p", f"source={ckpt}", "-p", "part_bytes=65536", "--watch", "--watch-timeout", "180"],
                    env=env, capture_output=True, text=True, timeout=240)
                assert run.returncode == 0, run.stdout + run.stderr + deploy_log.read_text()[-3000:]
                assert "COMPLETED" in (run.stdout + run.stderr).upper()
                assert httpx.get(f"{inference}/v1/weights").json()["version"] == version
