#!/usr/bin/env python
"""The tail of the demo's weight sync: the slowest ``sync-weights`` run of a ``baton demo`` against its median.

The RL demo (``demo.rl.run``: the tiny policy, one inference server, sync mode, in a temporary directory) runs for
``--steps`` steps; each step's sync is the wall time of the ``sync-weights`` flow call (publish the trainer's
checkpoint, the server loads and confirms it). The first sync, which waits for the temporary Prefect server to
start, is not a step and not counted. Two configurations, each in its own process, in one run:

- ``baton``: Baton's temporary Prefect server (``flows.local``, the default now): the start-up heap frozen, a
  request that SQLite refused with "database is locked" run again in the server after milliseconds;
- ``prefect``: Prefect's own temporary server (``BATON_TEMPORARY_PREFECT=prefect``, what the demo ran before),
  the baseline.

For each: median, p90 and max sync seconds, max / median (target: < 2), syncs over 1 s, and the 503 answers
Prefect's client waited out (``prefect.client`` logs each, then sleeps ~2 s).

The demo's syncs are 0.7 s or more apart, so SQLite's refusal that becomes the 2 s stall (see ``flows.local``)
comes rarely there. ``--stress N`` (default 200) runs a second table that makes it come often: N runs of a small
flow shaped like ``sync-weights`` (a task, a table artifact, an event; no servers) back to back, while another
thread emits 50 events a second (as a trainer sending its metrics as events would), in each configuration.

The load average of the machine before and after each run is recorded: other work on its 2 cores shows in the
tail. Results go to a table and to ``bench/results/sync_tail.json``.

    python bench/sync_tail.py                  # 100 steps and 200 stress runs each (~7 min)
    python bench/sync_tail.py --no-baseline    # Baton's server only
    python bench/sync_tail.py --stress 0       # the demo only
    python bench/sync_tail.py --quick          # 12 steps and 30 stress runs each, a smoke test; a temp file
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, log, machine_info, parser, results_path, write_results  # noqa: E402

TARGET = 2.0  # max sync / median sync
CONFIGS = {
    "baton": "Baton's temporary Prefect server (now)",
    "prefect": "Prefect's own temporary server (before)",
}


def count_retries() -> list[str]:
    """The 503 answers (and other retryable failures) Prefect's client waits out, as it logs them. Call after the
    settings are in place: it imports Prefect."""
    import logging

    import prefect.client.base  # noqa: F401  (Prefect's logging set-up first, or it would undo the level below)

    retries: list[str] = []

    class Retries(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "retryable" in record.getMessage():
                retries.append(record.getMessage()[:160])

    client_log = logging.getLogger("prefect.client")
    client_log.setLevel(logging.DEBUG)  # Prefect logs each retry at DEBUG (prefect/client/base.py:360)
    client_log.addHandler(Retries())
    client_log.propagate = False  # the counts only, not the lines
    return retries


def demo_child(run_dir: Path, steps: int) -> dict:
    """The demo; each step's sync seconds."""
    from demo.rl import run

    retries = count_retries()
    start = time.perf_counter()
    records = run(run_dir, steps=steps, progress=False)  # calls use_temporary_prefect again: the same home
    return {"seconds": [r.sync_s for r in records if r.version],  # the last step samples only: nothing synced
            "retries": retries, "wall_s": time.perf_counter() - start,
            "reward": [records[0].reward_mean, records[-1].reward_mean]}


def stress_child(runs: int) -> dict:
    """``runs`` flows shaped like ``sync-weights`` back to back, 50 events a second beside them; each run's
    seconds."""
    import threading

    from prefect import task
    from prefect.artifacts import create_table_artifact
    from prefect.events import emit_event

    from flows.inprocess import flow

    retries = count_retries()

    @task
    def take(i: int) -> int:
        return i

    @flow(name="sync-shaped")
    def sync_shaped(i: int) -> int:
        got = take.submit(i).result()
        create_table_artifact([{"run": i}], key=f"stress-{i}")
        emit_event(event="bench.stress.live", resource={"prefect.resource.id": f"bench.stress.{i}"})
        return got

    sync_shaped(0)  # the server's start-up, not counted
    stop = threading.Event()

    def metrics() -> None:
        n = 0
        while not stop.wait(0.02):
            emit_event(event="bench.stress.metric", resource={"prefect.resource.id": f"bench.metric.{n % 7}"},
                       payload={"n": n})
            n += 1

    threading.Thread(target=metrics, daemon=True).start()
    seconds = []
    start = time.perf_counter()
    for i in range(1, runs + 1):
        t = time.perf_counter()
        sync_shaped(i)
        seconds.append(time.perf_counter() - t)
    stop.set()
    return {"seconds": seconds, "retries": retries, "wall_s": time.perf_counter() - start}


def child(kind: str, config: str, n: int, out: Path) -> int:
    """One measurement in this process (Prefect reads its settings once); the results go to ``out``."""
    from flows.local import use_temporary_prefect

    with tempfile.TemporaryDirectory(prefix=f"baton-sync-tail-{kind}-{config}-") as tmp:
        use_temporary_prefect(Path(tmp) / "prefect", server=config)
        got = demo_child(Path(tmp), n) if kind == "demo" else stress_child(n)
    out.write_text(json.dumps(got))
    return 0


def measure(kind: str, config: str, n: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        load_before = os.getloadavg()[0]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        env.pop("PREFECT_API_URL", None)
        subprocess.run([sys.executable, __file__, "--child", kind, config, str(n), out.name], cwd=REPO, env=env,
                       check=True)
        got = json.loads(Path(out.name).read_text())
    seconds = got["seconds"]
    ordered = sorted(seconds)
    median = statistics.median(seconds)
    row = {"config": config, "what": CONFIGS[config], "n": len(seconds), "median_s": round(median, 4),
           "p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 4), "max_s": round(ordered[-1], 4),
           "max_over_median": round(ordered[-1] / median, 2), "over_1s": sum(s > 1.0 for s in seconds),
           "client_503_retries": sum("status code 503" in r for r in got["retries"]),
           "client_retries": len(got["retries"]), "retry_lines": got["retries"][:5],
           "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
           "wall_s": round(got["wall_s"], 1)}
    if "reward" in got:
        row["reward_first_last"] = [round(r, 3) for r in got["reward"]]
    return row | {"seconds": [round(s, 4) for s in seconds]}


def table(title: str, unit: str, rows: list[dict], target: bool) -> None:
    print(f"\n{title}")
    print(f"{'configuration':<42}{unit:>6}{'median s':>10}{'p90 s':>8}{'max s':>8}{'max/median':>12}"
          f"{'>1 s':>6}{'503s':>6}{'load':>12}")
    for r in rows:
        met = ("met" if r["max_over_median"] < TARGET else "MISSED") if target else ""
        print(f"{r['what']:<42}{r['n']:>6}{r['median_s']:>10.3f}{r['p90_s']:>8.3f}{r['max_s']:>8.3f}"
              f"{r['max_over_median']:>7.2f}x {met:<4}{r['over_1s']:>6}{r['client_503_retries']:>6}"
              f"{r['load_before']:>6.1f}>{r['load_after']:<5.1f}")
    if len(rows) == 2:
        print(f"max, now / before: {rows[0]['max_s'] / rows[1]['max_s']:.2f}x; "
              f"median, now / before: {rows[0]['median_s'] / rows[1]['median_s']:.2f}x")


def main() -> int:
    if sys.argv[1:2] == ["--child"]:  # --child KIND CONFIG N OUT: one measurement, in its own process
        kind, config, n, out = sys.argv[2:6]
        return child(kind, config, int(n), Path(out))
    p = parser(__doc__, "12 steps and 30 stress runs each, a smoke test")
    p.add_argument("--steps", type=int, help="demo steps per configuration (default 100; 12 with --quick)")
    p.add_argument("--stress", type=int, help="back-to-back runs per configuration (default 200; 30 with --quick; "
                                              "0: none)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run Prefect's own temporary server, the configuration before (default: yes)")
    args = p.parse_args()
    steps = args.steps or (12 if args.quick else 100)
    stress = args.stress if args.stress is not None else (30 if args.quick else 200)
    configs = ("baton", "prefect") if args.baseline else ("baton",)
    demo, stressed = [], []
    for config in configs:
        log(f"{CONFIGS[config]}: {steps} demo steps")
        demo.append(measure("demo", config, steps))
        log({k: v for k, v in demo[-1].items() if k not in ("seconds", "retry_lines")})
    for config in configs if stress else ():
        log(f"{CONFIGS[config]}: {stress} sync-shaped flows back to back, 50 events/s beside them")
        stressed.append(measure("stress", config, stress))
        log({k: v for k, v in stressed[-1].items() if k not in ("seconds", "retry_lines")})
    table(f"The demo's syncs ({steps} steps, tiny model, 1 server; target: max < {TARGET:g}x median)", "steps",
          demo, target=True)
    if stressed:
        table(f"Sync-shaped flows back to back, 50 events/s beside them ({stress} runs)", "runs", stressed,
              target=False)
    doc = {"machine": machine_info(), "command": " ".join(["python", "bench/sync_tail.py", *sys.argv[1:]]),
           "demo": {"model": "tiny", "servers": 1, "mode": "sync", "steps": steps, "part_bytes": 64 << 20,
                    "target": {"max_over_median_below": TARGET}, "rows": demo},
           "stress": {"runs": stress, "events_per_s_beside": 50, "rows": stressed}}
    write_results(results_path(args, "sync_tail"), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
