#!/usr/bin/env python
"""``baton sync`` from a fresh process to one ``baton serve`` server of the ``tiny`` model, end to end, in each way
it can record its run in Prefect, measured in turns in the same run:

- ``temporary``: ``--temporary-prefect``, Prefect's own temporary server started for the command (what ``baton
  sync`` did before ``flows.home``), its home already migrated by a first run;
- ``reused``: Baton's local server (``flows.home``), started by a first run that is reported apart;
- ``api_url``: ``PREFECT_API_URL`` set to a running Prefect API (here the reused one), so nothing is started.

Each timed run is a new ``python -m baton_cli sync VERSION --snapshot-root ROOT --server URL`` (the wall time of
the whole process: interpreter, imports, the flow run with its table artifact and event, exit), versions
alternating so that every run changes what the server serves. Goal: the reused mode's median <= 3 s.

    python bench/sync_cli_bench.py            # 3 runs of each mode; writes bench/results/sync_cli.json
    python bench/sync_cli_bench.py --quick    # 1 run of each; writes to a temp file
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import log, machine_info, parser, results_path, write_results  # noqa: E402

import storage  # noqa: E402
from flows import home as prefect_home  # noqa: E402
from harness.launch import baton_serve  # noqa: E402
from infer.config import get_config  # noqa: E402
from infer.model import random_state_dict  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
GOAL_S = 3.0
MODES = ("temporary", "reused", "api_url")


def timed_sync(env: dict[str, str], version: str, snap: str, url: str, *extra: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "baton_cli", "sync", version, "--snapshot-root", snap, "--server",
                           url, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or f"live {version}" not in done.stdout:
        raise RuntimeError(f"baton sync {version} failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-4000:]}")
    return seconds


def main() -> None:
    ap = parser(__doc__, "one run of each mode")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each mode, median kept (default 3)")
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "BATON_HOME"}
    base_env |= {"PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="baton-sync-cli-bench-") as tmp:
        work = Path(tmp)
        snap = str(work / "snap")
        for i in range(2):
            storage.publish(random_state_dict(get_config("tiny"), seed=i), snap, f"v{i}")
        envs = {"temporary": base_env | {"PREFECT_HOME": str(work / "prefect-temporary")},
                "reused": base_env | {"BATON_HOME": str(work / "baton"), "PREFECT_HOME": str(work / "client")}}
        extra = {"temporary": ("--temporary-prefect",), "reused": (), "api_url": ()}
        runs: dict[str, list[float]] = {m: [] for m in MODES}
        first: dict[str, float] = {}
        try:
            with baton_serve(snap, "--model", "tiny") as server:
                for mode in ("temporary", "reused"):  # the temporary home's migration; the reused server's start
                    first[mode] = timed_sync(envs[mode], "v1", snap, server.url, *extra[mode])
                    log(f"{mode}: first run {first[mode]:.2f} s")
                reused = prefect_home.find(work / "baton" / "prefect")
                if reused is None:
                    raise RuntimeError("the first reused run left no server behind")
                envs["api_url"] = base_env | {"PREFECT_API_URL": reused.url, "BATON_HOME": str(work / "unused"),
                                              "PREFECT_HOME": str(work / "client")}
                for i in range(repeats):
                    for j, mode in enumerate(MODES):  # in turns, so that each mode sees the same machine
                        version = f"v{(i * len(MODES) + j) % 2}"  # v1 is live after the first runs
                        seconds = timed_sync(envs[mode], version, snap, server.url, *extra[mode])
                        runs[mode].append(seconds)
                        log(f"{mode}: {seconds:.2f} s")
                if (work / "unused").exists():
                    raise RuntimeError("with PREFECT_API_URL set, baton sync still made a Baton home")
        finally:
            prefect_home.stop(work / "baton" / "prefect")
    medians = {m: statistics.median(r) for m, r in runs.items()}
    doc = {"machine": machine_info(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "model": "tiny", "servers": 1, "repeats": repeats, "first_run_s": first, "runs_s": runs,
           "median_s": medians, "goal_reused_median_s": GOAL_S, "met": medians["reused"] <= GOAL_S,
           "command": "python bench/sync_cli_bench.py"}
    print(f"\nbaton sync to one tiny server from a fresh process, median of {repeats} (goal: reused <= {GOAL_S} s):")
    for mode in MODES:
        print(f"  {mode:>10}: {medians[mode]:6.2f} s   runs {', '.join(f'{s:.2f}' for s in runs[mode])}"
              + (f"   first run {first[mode]:.2f} s" if mode in first else ""))
    write_results(results_path(args, "sync_cli"), doc)


if __name__ == "__main__":
    main()
