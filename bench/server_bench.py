#!/usr/bin/env python
"""Benchmark of the inference server, as ratios against baselines measured in the same run.

1. Update latency: ``POST /v1/update_weights`` (server-reported seconds, and wall time at the client) against a
   bare ``storage.load_snapshot`` of the same snapshot into a model of the same size in this process, both with
   the default ``verify="stream"`` (every byte read once), for each swap mode.
2. Peak memory of the server process (``VmHWM`` of /proc/PID/status) after updates in each mode, against its
   steady RSS holding one model: ``in_place`` should stay near one model, ``double_buffer`` near two.
3. Completions: requests/s and p50/p99 latency from concurrent clients, with no update running and with
   updates flipping versions back to back, in each swap mode.

    python bench/server_bench.py           # 1b model for updates/memory, small for completions (~5 min)
    python bench/server_bench.py --quick   # tiny models, a smoke test; writes to a temp file
"""

from __future__ import annotations

import gc
import logging
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

import httpx  # noqa: E402
from common import log, machine_info, parser, proc_status_bytes, results_path, write_results  # noqa: E402

import storage  # noqa: E402
from harness.launch import baton_serve  # noqa: E402
from infer.config import get_config  # noqa: E402
from infer.model import Decoder, random_state_dict  # noqa: E402

MODES = ("in_place", "double_buffer")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
MiB = 1 << 20


VERSIONS = ("v1", "v2", "v3")
# Updates cycle v2, v3, v1, ...: the target is never the version a double_buffer spare still holds, so every
# update really loads (switching back to the spare's version is measured on its own, as "rollback").
CYCLE = ("v2", "v3", "v1")


def publish_versions(model: str, root: Path) -> int:
    """v1, v2 and v3 of ``model`` (different random weights); returns the snapshot's bytes."""
    total = 0
    for seed, version in enumerate(VERSIONS, start=1):
        state = random_state_dict(get_config(model), seed)
        total = storage.publish(state, str(root), version, part_bytes=256 * MiB).bytes
        del state
        gc.collect()
    return total


def bare_load_seconds(model: str, root: Path, repeats: int) -> float:
    target = Decoder(get_config(model))
    best = float("inf")
    for version in VERSIONS * repeats:
        best = min(best, storage.load_snapshot(str(root), version, into=target.state_dict()).seconds)
    del target
    gc.collect()
    return best


def update_rows(model: str, root: Path, repeats: int, bare: float, nbytes: int) -> list[dict]:
    rows = []
    for mode in MODES:
        with baton_serve(str(root), "--model", model, "--version", "v1", "--swap", mode, timeout=600) as srv:
            steady = proc_status_bytes("VmRSS", srv.pid)
            server_s, wall_s = [], []
            for version in CYCLE * repeats:
                wall, seconds = timed_update(str(srv), version)
                wall_s.append(wall)
                server_s.append(seconds)
            rollback_wall = timed_update(str(srv), CYCLE[-2])[0]  # the version before the current one
            peak = proc_status_bytes("VmHWM", srv.pid)
        row = {"mode": mode, "model": model, "snapshot_bytes": nbytes, "bare_load_s": bare,
               "update_s_median": statistics.median(server_s), "update_wall_s_median": statistics.median(wall_s),
               "ratio_to_bare_load": statistics.median(server_s) / bare, "steady_rss_MiB": steady / MiB,
               "rollback_wall_s": rollback_wall, "peak_rss_MiB": peak / MiB, "peak_in_models": peak / nbytes}
        log(f"{mode}: update {row['update_s_median']:.2f}s ({row['ratio_to_bare_load']:.2f}x bare), "
            f"peak {row['peak_rss_MiB']:.0f} MiB")
        rows.append(row)
    return rows


def timed_update(url: str, version: str) -> tuple[float, float]:
    """(wall seconds at the client, seconds the server reports) of one update."""
    start = time.perf_counter()
    r = httpx.post(f"{url}/v1/update_weights", json={"version": version}, timeout=600)
    wall = time.perf_counter() - start
    if r.status_code != 200:
        raise RuntimeError(f"update to {version} failed: {r.text}")
    return wall, r.json()["seconds"]


def load_test(url: str, seconds: float, clients: int, max_tokens: int) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        nonlocal errors
        with httpx.Client(timeout=120) as http:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                r = http.post(f"{url}/v1/completions",
                              json={"prompt": f"client {i}", "max_tokens": max_tokens, "temperature": 0})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"requests": len(latencies), "errors": errors, "req_s": len(latencies) / elapsed,
            "p50_s": latencies[len(latencies) // 2] if latencies else None,
            "p99_s": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None}


def throughput_rows(model: str, root: Path, seconds: float, clients: int, max_tokens: int) -> list[dict]:
    rows = []
    for mode in MODES:
        with baton_serve(str(root), "--model", model, "--version", "v1", "--swap", mode, timeout=600) as srv:
            quiet = load_test(str(srv), seconds, clients, max_tokens)
            stop, updates = threading.Event(), []

            def flip() -> None:
                while not stop.is_set():
                    v = CYCLE[len(updates) % len(CYCLE)]
                    updates.append(httpx.post(f"{srv}/v1/update_weights", json={"version": v}, timeout=600).status_code)

            flipper = threading.Thread(target=flip)
            flipper.start()
            busy = load_test(str(srv), seconds, clients, max_tokens)
            stop.set()
            flipper.join()
        row = {"mode": mode, "model": model, "clients": clients, "max_tokens": max_tokens, "quiet": quiet,
               "during_updates": busy, "updates_done": len(updates), "update_failures": sum(c != 200 for c in updates),
               "req_s_ratio": busy["req_s"] / quiet["req_s"] if quiet["req_s"] else None}
        log(f"{mode}: {quiet['req_s']:.2f} req/s quiet, {busy['req_s']:.2f} during {len(updates)} updates")
        rows.append(row)
    return rows


def table(updates: list[dict], throughput: list[dict]) -> str:
    lines = ["weight update (default verify=stream) vs a bare load_snapshot of the same snapshot; server peak RSS",
             f"{'mode':<15}{'model':<7}{'GiB':>6}{'bare s':>8}{'update s':>10}{'ratio':>7}{'wall s':>8}"
             f"{'rollback s':>12}{'steady MiB':>12}{'peak MiB':>10}{'peak/model':>12}"]
    for r in updates:
        lines.append(f"{r['mode']:<15}{r['model']:<7}{r['snapshot_bytes'] / (1 << 30):>6.2f}{r['bare_load_s']:>8.2f}"
                     f"{r['update_s_median']:>10.2f}{r['ratio_to_bare_load']:>6.2f}x{r['update_wall_s_median']:>8.2f}"
                     f"{r['rollback_wall_s']:>12.2f}{r['steady_rss_MiB']:>12.0f}{r['peak_rss_MiB']:>10.0f}"
                     f"{r['peak_in_models']:>11.2f}x")
    lines += ["", "completions (greedy): quiet vs while updates run back to back (v2, v3, v1, ...)",
              f"{'mode':<15}{'model':<7}{'req/s':>7}{'p50 s':>7}{'p99 s':>7}{'| req/s':>8}{'p50 s':>7}{'p99 s':>7}"
              f"{'updates':>9}{'errors':>8}{'ratio':>7}"]
    for r in throughput:
        q, b = r["quiet"], r["during_updates"]
        lines.append(f"{r['mode']:<15}{r['model']:<7}{q['req_s']:>7.2f}{q['p50_s']:>7.2f}{q['p99_s']:>7.2f}"
                     f"{b['req_s']:>8.2f}{b['p50_s']:>7.2f}{b['p99_s']:>7.2f}{r['updates_done']:>9}"
                     f"{q['errors'] + b['errors'] + r['update_failures']:>8}{r['req_s_ratio']:>6.2f}x")
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__, "tiny models and short windows: a smoke test")
    ap.add_argument("--update-model", help="model for update latency and memory (default 1b; --quick tiny)")
    ap.add_argument("--serve-model", help="model for completions throughput (default small; --quick tiny)")
    ap.add_argument("--seconds", type=float, help="length of each load window (default 15; --quick 2)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent completion clients (default 4)")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens per completion (default 16)")
    ap.add_argument("--repeats", type=int, default=2, help="update round trips per mode (default 2)")
    args = ap.parse_args()
    update_model = args.update_model or ("tiny" if args.quick else "1b")
    serve_model = args.serve_model or ("tiny" if args.quick else "small")
    seconds = args.seconds or (2 if args.quick else 15)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="baton-server-bench-") as tmp:
        big, small = Path(tmp) / update_model, Path(tmp) / f"serve-{serve_model}"
        log(f"publishing two versions of {update_model} and {serve_model}")
        nbytes = publish_versions(update_model, big)
        publish_versions(serve_model, small)
        bare = bare_load_seconds(update_model, big, args.repeats)
        log(f"bare load_snapshot of {nbytes / (1 << 30):.2f} GiB: {bare:.2f}s")
        updates = update_rows(update_model, big, args.repeats, bare, nbytes)
        throughput = throughput_rows(serve_model, small, seconds, args.clients, args.max_tokens)
    print(table(updates, throughput))
    out = results_path(args, "server")
    write_results(out, {"machine": machine_info(), "quick": args.quick, "updates": updates,
                        "completions": throughput, "total_seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
