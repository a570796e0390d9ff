"""Scenario 6: the Prefect server killed and started again during a ``sync-weights`` run. Whatever the run's
outcome, each server serves one complete version, and the rerun of the same sync converges."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import storage
from harness.chaos.processes import PrefectServer, start_program
from harness.chaos.servers import served_version
from harness.chaos.tally import Tally
from harness.launch import wait_until


def run_sync(prefect: PrefectServer, version: str, root: str, servers: list[str], source: str, log_path: Path,
             kill_after: float | None = None, down_s: float = 0.0, timeout: float = 240) -> tuple[str, float]:
    """Runs ``sync-weights`` in its own process. With ``kill_after``, SIGKILLs the Prefect server that long after
    the flow run began and starts it again ``down_s`` later. Returns (outcome, seconds from flow start to exit)."""
    began = time.perf_counter()
    with log_path.open("w") as out:
        proc = start_program("sync", version, root, json.dumps(servers), source, stdout=out, stderr=subprocess.STDOUT,
                             env=prefect.env())
    try:
        wait_until(lambda: "Beginning flow run" in log_path.read_text() or proc.poll() is not None, 120,
                   "flow run start", 0.02)
        began = time.perf_counter()
        late = False
        if kill_after is not None:
            time.sleep(kill_after)
            late = proc.poll() is not None
            prefect.kill()
            time.sleep(down_s)
            prefect.start()
        proc.wait(timeout)
        outcome = "completed" if proc.returncode == 0 and "SYNC-COMPLETED" in log_path.read_text() else \
            f"failed (exit {proc.returncode})"
        outcome += " (it had ended before the kill)" if late else ""
    except subprocess.TimeoutExpired:
        outcome = "hung"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return outcome, time.perf_counter() - began


def last_error(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text().splitlines() if "Error" in ln or "error" in ln]
    return (lines[-1] if lines else "no error line")[:200]


def prefect_restarts(tally: Tally, workdir: Path, trials: int, rng: random.Random, model: str = "small",
                     outage: float = 20.0) -> None:
    """Two ``baton serve`` processes, a real Prefect server; each trial syncs a new version from a checkpoint and
    kills Prefect at a random moment of the run, restarting it at once (even trials) or after ``outage`` seconds
    (odd ones). Whatever the run's outcome, each server must serve one complete version; the rerun of the same
    sync must complete with both servers on the new version."""
    import paddle

    from harness.launch import baton_serve
    from infer.config import get_config
    from infer.model import random_state_dict
    from infer.weights import state_digest

    config = get_config(model)
    root = str(workdir / "sync-snap")
    versions = {f"s{t}": 100 + t for t in range(trials + 2)}  # s0: what the servers start on; s1: calibration
    digests = {v: state_digest(random_state_dict(config, s)) for v, s in versions.items()}
    storage.publish(random_state_dict(config, versions["s0"]), root, "s0", part_bytes=16 << 20)
    sources = {}
    for v, seed in versions.items():
        (workdir / "ckpt" / v).mkdir(parents=True, exist_ok=True)
        sources[v] = str(workdir / "ckpt" / v / "model_state.pdparams")
        paddle.save({k: paddle.to_tensor(a) for k, a in random_state_dict(config, seed).items()}, sources[v])
    home = workdir / "prefect"
    home.mkdir()
    prefect = PrefectServer(home).start()
    try:
        args = ("--model", model, "--version", "s0")
        with baton_serve(root, *args, timeout=300) as a, baton_serve(root, *args, timeout=300) as b:
            servers = [a.url, b.url]
            outcome, window = run_sync(prefect, "s1", root, servers, sources["s1"], workdir / "sync-calibrate.log")
            if outcome != "completed":
                why = last_error(workdir / "sync-calibrate.log")
                raise RuntimeError(f"sync-weights without a fault: {outcome}: {why}")
            tally.note(f"sync-weights run {window:.1f}s (flow start to exit)")
            for t in range(2, trials + 2):
                version, log_path = f"s{t}", workdir / f"sync-{t}.log"
                down_s = 0.0 if t % 2 == 0 else outage  # odd trials: Prefect stays down a while
                kill_after = rng.uniform(0, 0.7 * window)  # the last 30% is the process shutting down
                outcome, _ = run_sync(prefect, version, root, servers, sources[version], log_path,
                                      kill_after=kill_after, down_s=down_s)
                tally.faults += 1
                tally.note(f"killed {kill_after:.1f}s into the run, down {down_s:.0f}s, restarted: the run {outcome}")
                completed = outcome.startswith("completed")
                if not completed:
                    tally.note(f"its error: {last_error(log_path)}")
                fleet = [served_version(url, digests) for url in servers]
                if any(v is None for v in fleet):
                    tally.add("bad", f"after the restart a server serves no complete version: {fleet}")
                    continue
                rerun, _ = run_sync(prefect, version, root, servers, sources[version], workdir / f"sync-{t}-rerun.log")
                fleet = [served_version(url, digests) for url in servers]
                if outcome == "hung" or rerun != "completed" or fleet != [version, version]:
                    tally.add("bad", f"first run {outcome}, rerun {rerun}, servers serve {fleet}")
                else:
                    tally.add("succeeded" if completed else "refused_clean", outcome)
    finally:
        prefect.stop()


