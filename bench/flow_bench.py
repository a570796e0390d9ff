#!/usr/bin/env python
"""End-to-end benchmark of the ``sync-weights`` flow against a raw copy of the same bytes, in one run.

1. In-process syncs: a trainer checkpoint (one ``paddle.save`` file) of ``medium`` (1.06 GiB) and of ``1b``
   (3.87 GiB) goes to two local inference servers through ``sync-weights`` (publish as parts, both servers load
   and confirm). Each run is split into publish (the publish task's own seconds: read the checkpoint, write
   the parts, fsync, manifest), server load (the slower server's own update seconds) and orchestration
   (everything else: Prefect's flow and task runs, HTTP, confirmation). Baseline: a raw copy of the
   checkpoint file (read + write + fsync) in this process. Prefect's temporary server is started by a warm-up
   run first; its start-up is reported apart.
2. Deployment runs: a real ``prefect server start`` and ``baton deploy``; runs of ``sync-weights/sync-weights``
   created through the API as ``prefect deployment run`` creates them. Reported from the server's own
   timestamps: creation to Running (the start latency), and Running to Completed.

Goals: orchestration <= 0.3 s; sync of ``medium`` <= 1.5x the raw copy; a deployment run starts within 2 s.

    python bench/flow_bench.py            # about 6 minutes; writes bench/results/flow.json
    python bench/flow_bench.py --quick    # small models, a smoke test; writes to a temp file
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", category=UserWarning)

from flows.local import use_temporary_prefect  # noqa: E402

use_temporary_prefect(os.environ.get("PREFECT_HOME") or tempfile.mkdtemp(prefix="baton-flow-bench-prefect-"))

import logging  # noqa: E402

import httpx  # noqa: E402
import paddle  # noqa: E402
from common import free_port, log, machine_info, parser, results_path, wait_until, write_results  # noqa: E402

from flows.sync import sync_weights  # noqa: E402
from harness.launch import baton_serve, logged_process  # noqa: E402
from infer.config import get_config  # noqa: E402
from infer.model import random_state_dict  # noqa: E402

logging.getLogger("httpx").setLevel(logging.WARNING)
GOALS = {"orchestration_s": 0.3, "flow_over_copy": 1.5, "deploy_start_s": 2.0}


def raw_copy_seconds(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    seconds = time.perf_counter() - start
    dst.unlink()
    return seconds


def write_checkpoints(work: Path, model: str, versions: list[str]) -> dict[str, Path]:
    log(f"writing {len(versions)} trainer checkpoints of {model}")
    config, out = get_config(model), {}
    for i, version in enumerate(versions):
        ckpt = work / "trainer" / model / version
        ckpt.mkdir(parents=True)
        state = {k: paddle.to_tensor(v) for k, v in random_state_dict(config, seed=i).items()}
        paddle.save(state, str(ckpt / "model_state.pdparams"))
        del state
        out[version] = ckpt
    return out


def in_process_syncs(work: Path, model: str, repeats: int, part_size: int, gap: float) -> dict:
    """Warm-up sync, then ``repeats`` timed ones, ``gap`` seconds apart (a trainer step between syncs)."""
    versions = [f"{model}-v{i}" for i in range(repeats + 1)]
    checkpoints = write_checkpoints(work, model, versions)
    nbytes = (checkpoints[versions[0]] / "model_state.pdparams").stat().st_size
    snap = str(work / f"snap-{model}")
    with baton_serve(snap, "--model", model, ready=False, timeout=900) as a, \
            baton_serve(snap, "--model", model, ready=False, timeout=900) as b:
        servers = [a.url, b.url]
        start = time.perf_counter()
        sync_weights(versions[0], snap, servers, source=str(checkpoints[versions[0]]), part_bytes=part_size)
        warm = time.perf_counter() - start
        log(f"{model}: warm-up sync {warm:.2f}s")
        runs = []
        for version in versions[1:]:
            time.sleep(gap)
            copy = raw_copy_seconds(checkpoints[version] / "model_state.pdparams", work / "raw-copy")
            start = time.perf_counter()
            rows = sync_weights(version, snap, servers, source=str(checkpoints[version]), part_bytes=part_size)
            wall = time.perf_counter() - start
            publish, load = rows[0]["publish_work_s"], max(r["seconds"] for r in rows)
            runs.append({"version": version, "raw_copy_s": copy, "flow_s": wall, "publish_s": publish,
                         "server_load_s": load, "orchestration_s": wall - publish - load})
            log(f"{version}: flow {wall:.2f}s = publish {publish:.2f} + load {load:.2f} + "
                f"orchestration {wall - publish - load:.2f}; raw copy {copy:.2f}s")
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "version"}
    return {"model": model, "checkpoint_bytes": nbytes, "servers": 2, "first_sync_s": warm, "runs": runs,
            "median": med, "flow_over_copy": med["flow_s"] / med["raw_copy_s"],
            "seconds_per_gib": {k: med[k] / (nbytes / (1 << 30)) for k in ("publish_s", "server_load_s", "flow_s")}}


def _at(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def create_run(http: httpx.Client, url: str, params: dict) -> dict:
    """POST a flow run as ``prefect deployment run`` does, retrying a 503 as Prefect's client does (SQLite busy)."""
    for attempt in range(5):
        r = http.post(url, json={"parameters": params})
        if r.status_code != 503:
            return r.raise_for_status().json()
        time.sleep(0.5 * (attempt + 1))
    return r.raise_for_status().json()


def deployment_runs(work: Path, runs: int) -> dict:
    """Runs created through the API against ``baton deploy``; start latency and duration from the server's own
    timestamps (``created``, ``start_time``, ``end_time``)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect-server"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    prefect = shutil.which("prefect", path=str(Path(sys.executable).parent)) or "prefect"
    ckpt = write_checkpoints(work, "tiny", ["deploy"])["deploy"]
    snap = str(work / "snap-deploy")
    with logged_process([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env,
                 work / "prefect-server.log"), baton_serve(snap, ready=False) as server, httpx.Client() as http:
        wait_until(lambda: http.get(f"{api}/health").status_code == 200, 180, "prefect server", 0.5)
        with logged_process([sys.executable, "-m", "baton_cli", "deploy"], env, work / "deploy.log"):
            deployment: dict = {}
            wait_until(lambda: deployment.update(
                http.get(f"{api}/deployments/name/sync-weights/sync-weights").raise_for_status().json()) is None,
                180, "baton deploy", 0.5)
            time.sleep(3)  # the runner's first poll has happened
            rows = []
            for i in range(runs):
                params = {"version": f"d{i}", "snapshot_root": snap, "servers": [server.url],
                          "source": str(ckpt)}
                run = create_run(http, f"{api}/deployments/{deployment['id']}/create_flow_run", params)
                state: dict = {}
                wait_until(lambda: state.update(http.get(f"{api}/flow_runs/{run['id']}").json()) is None
                           and state["state_type"] in ("COMPLETED", "FAILED", "CRASHED"), 120, f"run {i}", 0.1)
                if state["state_type"] != "COMPLETED":
                    raise RuntimeError(f"deployment run {i} ended {state['state_type']}: {state['state']['message']}\n"
                                       + (work / "deploy.log").read_text()[-4000:])
                created, started, ended = _at(run["created"]), _at(state["start_time"]), _at(state["end_time"])
                rows.append({"start_s": started - created, "run_s": ended - started, "total_s": ended - created})
                log(f"deployment run {i}: started {started - created:.2f}s after creation, ran {ended - started:.2f}s")
                time.sleep(0.7)  # creations land anywhere in the runner's poll interval
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"runs": rows, "median": med, "max_start_s": max(r["start_s"] for r in rows)}


def main() -> None:
    ap = parser(__doc__, "small models, a smoke test")
    ap.add_argument("--model", help="model size (default medium, 1.06 GiB; --quick small)")
    ap.add_argument("--big-model", help="the scale run (default 1b, 3.87 GiB; --quick: none)")
    ap.add_argument("--repeats", type=int, default=3, help="timed syncs, median kept (default 3)")
    ap.add_argument("--deploy-runs", type=int, default=5, help="deployment runs timed (default 5)")
    ap.add_argument("--part-size", type=int, default=128 << 20, help="part bytes (default 128 MiB)")
    ap.add_argument("--deploy-only", action="store_true", help="only the deployment runs (results to a temp file)")
    args = ap.parse_args()
    model = args.model or ("small" if args.quick else "medium")
    big = args.big_model if args.big_model is not None else (None if args.quick else "1b")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="baton-flow-bench-") as tmp:
        work = Path(tmp)
        if args.deploy_only:
            print(deployment_runs(work, args.deploy_runs)["median"])
            return
        syncs = [in_process_syncs(work, model, args.repeats, args.part_size, gap=1.0)]
        if big:
            syncs.append(in_process_syncs(work, big, 1, args.part_size, gap=1.0))
            shutil.rmtree(work / "trainer" / big)
        deploy = deployment_runs(work, 2 if args.quick else args.deploy_runs)
    main_sync = syncs[0]
    verdicts = {"orchestration_s": main_sync["median"]["orchestration_s"] <= GOALS["orchestration_s"],
                "flow_over_copy": main_sync["flow_over_copy"] <= GOALS["flow_over_copy"],
                "deploy_start_s": deploy["max_start_s"] <= GOALS["deploy_start_s"]}
    print(f"\nsync-weights to 2 servers (median of the timed runs; goals: orchestration <= "
          f"{GOALS['orchestration_s']} s, flow <= {GOALS['flow_over_copy']}x copy):")
    print(f"{'model':>8}{'GiB':>6}{'raw copy s':>11}{'flow s':>9}{'publish s':>11}{'load s':>9}{'orchestration s':>17}"
          f"{'flow/copy':>11}{'publish s/GiB':>15}{'load s/GiB':>12}")
    for s in syncs:
        m, gib = s["median"], s["checkpoint_bytes"] / (1 << 30)
        print(f"{s['model']:>8}{gib:>6.2f}{m['raw_copy_s']:>11.2f}{m['flow_s']:>9.2f}{m['publish_s']:>11.2f}"
              f"{m['server_load_s']:>9.2f}{m['orchestration_s']:>17.2f}{s['flow_over_copy']:>10.2f}x"
              f"{s['seconds_per_gib']['publish_s']:>15.2f}{s['seconds_per_gib']['server_load_s']:>12.2f}")
    print(f"\ndeployment runs under baton deploy ({len(deploy['runs'])}): start after creation median "
          f"{deploy['median']['start_s']:.2f} s, max {deploy['max_start_s']:.2f} s (goal <= "
          f"{GOALS['deploy_start_s']} s); run {deploy['median']['run_s']:.2f} s")
    print("verdicts: " + ", ".join(f"{k} {'ok' if v else 'MISSES'}" for k, v in verdicts.items()))
    out = results_path(args, "flow")
    write_results(out, {"machine": machine_info(), "goals": GOALS, "syncs": syncs, "deployment": deploy,
                        "verdicts": verdicts, "total_seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
