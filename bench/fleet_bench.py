#!/usr/bin/env python
"""A fleet's flip, measured: ``sync-weights`` over N real ``baton serve --swap double_buffer`` servers (the ``tiny``
model) on loopback, for N = 1, 4, 16 and 32, and an ``in_place`` server's rollback from a delta.

For each N:
- sync s: ``sync_weights`` of a new version, end to end (read, prepare everywhere, commit everywhere, confirm);
- overhead per server: (sync s - the slowest server's own prepare) / N: what orchestration costs a server;
- flip window: from the first server to the last serving the new version, as seen by one poller per server
  reading ``GET /v1/weights`` in a loop (its resolution, the median time between two polls, is reported beside);
- failed sync: the same fleet plus one unreachable member while clients send completions to every server; the
  replies that came from the new version (must be 0) and from the old.
Rollback: an ``in_place`` server (in this process, ``medium`` sizes in bf16) that took a delta goes back to its
base by reapplying the delta, against today's way (reloading the base from storage), alternating, medians.

Targets (issue 32): flip window over 4 servers <= 50 ms; 0 replies from the new version in a failed sync.

    python bench/fleet_bench.py            # about 6 minutes; writes bench/results/fleet.json
    python bench/fleet_bench.py --quick    # N = 1, 2, tiny rollback; a smoke test, writes to a temp file
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", category=UserWarning)

from flows.local import use_temporary_prefect  # noqa: E402

use_temporary_prefect(os.environ.get("PREFECT_HOME") or tempfile.mkdtemp(prefix="baton-fleet-bench-prefect-"))

import logging  # noqa: E402

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from common import free_port, log, machine_info, parser, results_path, write_results  # noqa: E402

import storage  # noqa: E402
from flows.sync import FleetSyncError, sync_weights  # noqa: E402
from harness.clients import Completions  # noqa: E402
from harness.launch import baton_serve  # noqa: E402
from infer.config import get_config  # noqa: E402
from infer.model import random_state_dict  # noqa: E402

logging.getLogger("httpx").setLevel(logging.WARNING)
logging.getLogger("prefect").setLevel(logging.ERROR)
TARGETS = {"flip_window_ms_4": 50.0, "new_version_replies_in_failed_sync": 0}


class Servers:
    """N ``baton serve`` processes started side by side; stopped on exit."""

    def __init__(self, root: str, n: int, *args: str):
        self.managers = [baton_serve(root, "--version", "v0", "--swap", "double_buffer", *args, timeout=300)
                         for _ in range(n)]

    def __enter__(self) -> list[str]:
        with ThreadPoolExecutor(8) as pool:
            return [str(url) for url in pool.map(lambda m: m.__enter__(), self.managers)]

    def __exit__(self, *exc) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda m: m.__exit__(None, None, None), self.managers))


class Pollers:
    """One thread per server reading ``/v1/weights`` until it serves ``version``; when each first saw it."""

    def __init__(self, urls: list[str], version: str):
        self.version, self.seen, self.gaps = version, {}, []
        self.threads = [threading.Thread(target=self._poll, args=(u,), daemon=True) for u in urls]

    def _poll(self, url: str) -> None:
        with httpx.Client(timeout=30) as client:
            last = time.perf_counter()
            while True:
                served = client.get(f"{url}/v1/weights").json()["version"]
                now = time.perf_counter()
                self.gaps.append(now - last)
                last = now
                if served == self.version:
                    self.seen[url] = now
                    return

    def __enter__(self) -> Pollers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for t in self.threads:
            t.join(timeout=60)

    @property
    def window_ms(self) -> float:
        return (max(self.seen.values()) - min(self.seen.values())) * 1000


def measure_fleet(root: str, n: int, rounds: int) -> dict:
    with Servers(root, n) as urls:
        syncs, windows, overheads, resolution = [], [], [], []
        for i in range(rounds):
            version = f"v{1 + i % 2}"
            with Pollers(urls, version) as pollers:
                start = time.perf_counter()
                rows = sync_weights(version, root, urls)
                took = time.perf_counter() - start
            prepare = max(r["seconds"] or 0 for r in rows)  # the slowest server: its load plus its commit
            syncs.append(took)
            overheads.append(max(took - prepare, 0.0) / n)
            windows.append(pollers.window_ms)
            resolution.append(statistics.median(pollers.gaps) * 1000)
        down = f"http://127.0.0.1:{free_port()}"
        target = "v2" if rows[0]["version"] == "v1" else "v1"
        with Completions(urls, threads=4) as clients:
            time.sleep(0.3)
            try:
                sync_weights(target, root, [*urls, down])
                failed = False
            except FleetSyncError:
                failed = True
        still = {httpx.get(f"{u}/v1/weights").json()["version"] for u in urls}
    row = {"servers": n, "sync_s_median": statistics.median(syncs), "sync_s": syncs,
           "overhead_per_server_s": statistics.median(overheads),
           "flip_window_ms_median": statistics.median(windows), "flip_window_ms_max": max(windows),
           "flip_window_ms": windows, "poll_resolution_ms": statistics.median(resolution),
           "failed_sync_refused": failed, "failed_sync_replies": dict(clients.seen),
           "new_version_replies_in_failed_sync": clients.seen.get(target, 0),
           "fleet_after_failed_sync": sorted(still)}
    log(f"N={n:>2}: sync {row['sync_s_median']:.3f} s, overhead/server {row['overhead_per_server_s'] * 1000:.1f} ms, "
        f"flip window median {row['flip_window_ms_median']:.1f} ms (max {row['flip_window_ms_max']:.1f}, polls every "
        f"{row['poll_resolution_ms']:.1f} ms); failed sync: {dict(clients.seen)} -> fleet on {sorted(still)}")
    return row


def measure_rollback(model: str, rounds: int) -> dict:
    """Reapplying the delta vs reloading the base, both through ``WeightManager.update`` in this process."""
    import paddle

    from infer.weights import WeightManager

    config = dataclasses.replace(get_config(model), dtype="bfloat16")
    root = tempfile.mkdtemp(prefix="baton-fleet-bench-rollback-")
    rng = np.random.default_rng(0)
    base = {k: paddle.to_tensor(v).astype("bfloat16") for k, v in random_state_dict(config, 1).items()}
    step = {}
    for k, v in base.items():  # ~2% of the elements move by one bf16 step, like an RL step at a small lr
        bits = v.view(paddle.uint16).numpy().copy()
        flat = bits.reshape(-1)
        flat[rng.random(flat.size) < 0.02] += 1
        step[k] = paddle.to_tensor(bits).view(paddle.bfloat16)
    cache = storage.LastPublished()
    storage.publish(base, root, "base", cache=cache)
    report = storage.publish(step, root, "step", base="base", cache=cache)
    manager = WeightManager(config, root, mode="in_place")
    manager.update("base")
    reverse, reload, paths = [], [], set()
    for _ in range(rounds):
        manager.update("step")
        start = time.perf_counter()
        paths.add(manager.update("base").path)
        reverse.append(time.perf_counter() - start)
        manager.update("step")
        manager._undo = None  # today's rollback: nothing to reverse, the base is loaded from storage
        start = time.perf_counter()
        paths.add(manager.update("base").path)
        reload.append(time.perf_counter() - start)
    row = {"model": model, "dtype": "bfloat16", "bytes": report.full_bytes, "delta_bytes": report.bytes,
           "reverse_s_median": statistics.median(reverse), "reload_s_median": statistics.median(reload),
           "reverse_over_reload": statistics.median(reverse) / statistics.median(reload), "paths": sorted(paths),
           "reverse_s": reverse, "reload_s": reload}
    log(f"rollback of a {report.bytes / report.full_bytes:.1%} delta on {model} bf16 ({report.full_bytes / 2**20:.0f} "
        f"MiB): reapply {row['reverse_s_median'] * 1000:.1f} ms vs reload {row['reload_s_median'] * 1000:.1f} ms "
        f"({row['reverse_over_reload']:.2f}x)")
    return row


def main() -> None:
    args = parser(__doc__, "N = 1, 2 and a tiny rollback, a smoke test").parse_args()
    sizes, rounds = ([1, 2], 3) if args.quick else ([1, 4, 16, 32], 7)
    root = tempfile.mkdtemp(prefix="baton-fleet-bench-")
    for seed, version in enumerate(["v0", "v1", "v2"]):
        storage.publish(random_state_dict(get_config("tiny"), seed), root, version)
    fleets = [measure_fleet(root, n, rounds) for n in sizes]
    rollback = measure_rollback("tiny" if args.quick else "medium", 3 if args.quick else 5)
    print("\n| servers | sync s | overhead / server ms | flip window ms median (max) | poll every ms "
          "| replies during a failed sync |\n|---|---|---|---|---|---|")
    for r in fleets:
        print(f"| {r['servers']} | {r['sync_s_median']:.3f} | {r['overhead_per_server_s'] * 1000:.1f} | "
              f"{r['flip_window_ms_median']:.1f} ({r['flip_window_ms_max']:.1f}) | {r['poll_resolution_ms']:.1f} | "
              f"{r['failed_sync_replies']} |")
    print(f"\nrollback from a delta: reapply {rollback['reverse_s_median'] * 1000:.1f} ms, reload "
          f"{rollback['reload_s_median'] * 1000:.1f} ms ({rollback['reverse_over_reload']:.2f}x)")
    write_results(results_path(args, "fleet"), {"benchmark": "fleet", "machine": machine_info(), "targets": TARGETS,
                                                 "fleets": fleets, "rollback": rollback})


if __name__ == "__main__":
    main()
