"""Delta versions on a real RL trajectory: bytes, publish and sync time against full versions of the same steps.

The demo's trainer (``demo.rl.Trainer``) trains a Qwen2-shaped model from a model directory in float32 master
weights with Adam and publishes them cast to bfloat16, the dtype the two inference servers (``baton serve
--model-dir``) serve. Each step samples rollouts from the servers, takes a real policy-gradient step, then, in the
same run, publishes the step twice: in full (the baseline) and as a delta on the previous step with the trainer's
``LastPublished`` cache; each is synced to both servers through the ``sync-weights`` flow, the delta first (the
servers then hold its base). After every sync each server's weight digest is checked against the version's
manifest; after the full one against the delta's, so every delta applied is bit-exact. Sizes: ``medium`` (hidden
2048, 6 layers; 1b-shaped layers, 0.57 GiB in bf16): a trainer of the ``1b`` shape (16.6 GB of float32 weights,
gradients and Adam moments) plus two bf16 servers does not fit this 24 GiB machine.

First, the library-level apply (``library_apply``): ``load_snapshot`` of a delta onto its base against a full load
of the same model into the same target, without and with the target's per-tensor sums (``held_sums``).
``--lrs`` picks the trajectory's learning rates (``--lrs`` alone: the library figures only). After each learning
rate's steps, the floor under the servers' update as they run here (``touch_floor_pair``): two processes touching
the changed words of their own model of that size at that density, at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import log, machine_info, parser, results_path, write_results

TARGETS = {"delta bytes / full at lr 1e-6": 0.15, "delta sync / full at lr 1e-6": 0.25,
           "delta update / full at lr 1e-6": 0.3, "delta sync / full at lr 1e-5": 1.0,
           "library delta apply / full load, no sums passed": 0.25,
           "library delta apply / full load, held sums passed": 0.25}


def library_apply(mib: int, rounds: int, work: Path, changed: float = 0.02) -> dict:
    """``load_snapshot`` of a delta onto the base its target holds against a full load of the same version into the
    same target, page cache warm, interleaved in one process (medians of ``rounds``): a bf16 model of ``mib`` MiB,
    ``changed`` of each tensor's elements (2%) one bf16 step away (an Adam step at lr 1e-6 changes 1-3%). The
    delta is loaded as a library caller would: with no base digest (the base proven by the target's sums, one pass
    over it on both cores, which the apply then advances), and with the target's per-tensor sums from the load
    before (``held_sums``: O(changed)). The machine's limits beside: the floor of touching the changed words alone,
    and memcpy, xxh3 and sum64 over the same bytes."""
    import numpy as np
    import paddle
    import xxhash

    import storage
    from storage.cores import each
    from storage.digest import sum64

    rng = np.random.default_rng(0)
    names = [f"layer{i}.weight" for i in range(mib // 4)]
    base = {n: (rng.standard_normal((1024, 2048), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
            for n in names}
    new = {}
    for n, a in base.items():
        b = a.copy().reshape(-1)
        pick = rng.random(b.size) < changed
        b[pick] = b[pick] + np.uint16(1)  # one bf16 step (positive or negative value: away from or toward zero)
        new[n] = b.reshape(a.shape)
    root = str(work / "library")

    def ref(bits):
        return {n: storage.TensorRef("BF16", a.shape, lambda a=a: a) for n, a in bits.items()}

    storage.publish(ref(base), root, "v0")
    assert storage.publish(ref(new), root, "v1", base="v0").kind == "delta"
    storage.publish(ref(new), root, "f1")
    target = {n: paddle.to_tensor(a).view(paddle.bfloat16) for n, a in base.items()}
    times: dict[str, list[float]] = {"full": [], "delta": [], "delta_sums": []}
    for r in range(rounds + 1):  # the first round warms the page cache and the compiled loops, and is dropped
        t = time.perf_counter()
        storage.load_snapshot(root, "f1", into=target)
        full = time.perf_counter() - t
        storage.load_snapshot(root, "v0", into=target)
        t = time.perf_counter()
        report = storage.load_snapshot(root, "v1", into=target)
        delta = time.perf_counter() - t
        assert report.path == "delta"
        sums = storage.load_snapshot(root, "v0", into=target, held_sums={}).sums
        t = time.perf_counter()
        report = storage.load_snapshot(root, "v1", into=target, held_sums=sums)
        delta_sums = time.perf_counter() - t
        assert report.path == "delta" and report.sums is not None
        if r:
            for k, v in (("full", full), ("delta", delta), ("delta_sums", delta_sums)):
                times[k].append(v)
    # the floor under any apply: XOR the changed words in place with their positions and values already decoded,
    # prefetched ahead, on both cores. About half the cache lines hold a change, and the CPU fetches lines in pairs
    # and streams, so this costs about what a full copy of the model does.
    held = {n: a.copy().reshape(-1) for n, a in base.items()}
    at = {n: np.flatnonzero(held[n] != new[n].reshape(-1)) for n in names}
    xor = {n: held[n][at[n]] ^ new[n].reshape(-1)[at[n]] for n in names}
    touch = _touch_loop()
    floor = []
    for r in range(rounds + 1):
        t = time.perf_counter()
        each(lambda n: touch(held[n], at[n], xor[n]), names)
        if r:
            floor.append(time.perf_counter() - t)
    # what decoding costs apart from writing: every window's zstd frame inflated and checked, on one core
    from storage import deltacodec

    src = storage.resolve(root, "v1")
    blobs = [(memoryview(src.read(i))[e.start:e.end], e.name) for i, h in enumerate(src.headers) for e in h.entries]
    inflate = []
    for _ in range(rounds + 1):
        t = time.perf_counter()
        for blob, name in blobs:
            view, windows = deltacodec._windows(blob, base[name].size)
            for window in windows:
                deltacodec._frame(view, window, base[name].size, 2)
        inflate.append(time.perf_counter() - t)
    raw = np.concatenate([a.reshape(-1) for a in base.values()])
    limits = {}
    for label, fn in (("memcpy", lambda: np.copyto(np.empty_like(raw), raw)), ("xxh3", lambda: xxhash.xxh3_128(raw)),
                      ("sum64", lambda: sum64(raw))):
        fn()
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t)
        limits[label + "_gib_s"] = round(raw.nbytes / statistics.median(runs) / 2**30, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"model_mib": mib, "rounds": rounds, "changed_elements": changed,
           "full_load_s": round(med["full"], 4), "delta_no_sums_s": round(med["delta"], 4),
           "delta_held_sums_s": round(med["delta_sums"], 4),
           "ratio_no_sums": round(statistics.median(d / f for d, f in zip(times["delta"], times["full"])), 3),
           "ratio_held_sums": round(statistics.median(d / f for d, f in zip(times["delta_sums"], times["full"])), 3),
           "touch_floor_s": round(statistics.median(floor), 4),
           "zstd_inflate_one_core_s": round(statistics.median(inflate[1:]), 4),
           "ratio_floor": round(statistics.median(floor) / med["full"], 3),
           "full_load_gib_s": round(mib / 1024 / med["full"], 2), **limits}
    log(f"library, {mib} MiB bf16, {changed:.1%} changed: full load {med['full'] * 1e3:.1f} ms, "
        f"delta {med['delta'] * 1e3:.1f} ms (x{out['ratio_no_sums']}), "
        f"with held sums {med['delta_sums'] * 1e3:.1f} ms (x{out['ratio_held_sums']}); "
        f"the floor, touching the changed words only: {out['touch_floor_s'] * 1e3:.1f} ms (x{out['ratio_floor']})")
    return out


def _touch_loop():
    import numba

    from storage.deltacodec import AHEAD, _prefetch

    @numba.njit(nogil=True)
    def touch(target, at, xor):  # pragma: no cover - compiled
        for j in range(at.size):
            if j + AHEAD < at.size:
                _prefetch(target, at[j + AHEAD])
            target[at[j]] ^= xor[j]

    return touch


def _touch_pair_child(seed: int, mib: int, changed: float, rounds: int, barrier, out) -> None:
    import numpy as np

    from storage.cores import each

    rng = np.random.default_rng(seed)
    held = [(rng.standard_normal(2 << 20, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
            for _ in range(max(1, mib // 4))]
    at = [np.flatnonzero(rng.random(h.size) < changed) for h in held]
    xor = [np.ones(a.size, np.uint16) for a in at]
    touch = _touch_loop()
    touch(held[0], at[0], xor[0])  # compiled before any round
    times = []
    for _ in range(rounds):
        barrier.wait()
        t = time.perf_counter()
        each(lambda i: touch(held[i], at[i], xor[i]), range(len(held)))
        times.append(time.perf_counter() - t)
    out.put(statistics.median(times))


def touch_floor_pair(mib: int, changed: float, rounds: int = 9) -> float:
    """The floor under the servers' delta update as this bench runs them, two at once on this machine's cores and
    memory: two processes, each XORing ``changed`` of the elements of its own ``mib`` MiB bf16 model (positions
    decoded beforehand, prefetched, both cores), started together each round; the slower one's median."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_touch_pair_child, args=(seed, mib, changed, rounds, barrier, out)) for seed in (1, 2)]
    for proc in procs:
        proc.start()
    got = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return max(got)


def bits(state: dict) -> dict:
    import numpy as np
    import paddle

    return {n: np.array((t.view(paddle.uint16) if t.dtype == paddle.bfloat16 else t).numpy()) for n, t in state.items()}


def run_lr(lr: float, sizes: dict, steps: int, work: Path, seed: int = 0) -> list[dict]:
    import httpx
    import numpy as np

    import storage
    from demo.rl import PROMPTS, Trainer, rollouts
    from demo.tiny_model import write_tiny_qwen2
    from flows.sync import sync_weights
    from harness.launch import baton_serve

    model_dir = write_tiny_qwen2(work / "model", seed, sizes, "bfloat16")
    root = str(work / "snapshots")
    trainer = Trainer("tiny", seed, lr, str(model_dir))
    cache = storage.LastPublished()
    rows = []
    with baton_serve(root, "--model-dir", str(model_dir), timeout=600) as a, \
            baton_serve(root, "--model-dir", str(model_dir), timeout=600) as b, httpx.Client(timeout=600) as http:
        urls = [str(a), str(b)]
        state = trainer.state()
        before = bits(state)
        storage.publish(state, root, "d_0", cache=cache)
        sync_weights("d_0", root, urls)
        for step in range(1, steps + 1):
            batch = rollouts(http, urls, PROMPTS[:2], 4, 4, seed * 1000 + step, trainer.tokenizer)
            trainer.step(batch, 4, f"d_{step - 1}", tis=False)
            state = trainer.state()
            now = bits(state)
            changed = sum(int(np.count_nonzero(now[n] != before[n])) for n in now) / sum(a.size for a in now.values())
            before = now
            t = time.perf_counter()
            full = storage.publish(state, root, f"f_{step}")
            full_publish = time.perf_counter() - t
            t = time.perf_counter()
            delta = storage.publish(state, root, f"d_{step}", base=f"d_{step - 1}", cache=cache)
            delta_publish = time.perf_counter() - t
            t = time.perf_counter()
            delta_rows = sync_weights(f"d_{step}", root, urls)
            delta_sync = time.perf_counter() - t
            served = [http.get(f"{u}/v1/weights").json() for u in urls]
            expected = storage.resolve(root, f"d_{step}").manifest.digest
            assert all(s["digest"] == expected for s in served), (served, expected)
            t = time.perf_counter()
            full_rows = sync_weights(f"f_{step}", root, urls)
            full_sync = time.perf_counter() - t
            assert all(http.get(f"{u}/v1/weights").json()["digest"] == expected for u in urls)
            storage.prune(root, keep_last=4)  # keeps every base a kept delta needs
            row = {"lr": lr, "step": step, "changed_elements": round(changed, 5), "kind": delta.kind,
                   "full_bytes": full.bytes, "delta_bytes": delta.bytes,
                   "bytes_ratio": round(delta.bytes / full.bytes, 4),
                   "server_read_full": full_rows[0]["bytes"], "server_read_delta": delta_rows[0]["bytes"],
                   "load_path": served[0]["load_path"],
                   "publish_full_s": round(full_publish, 3), "publish_delta_s": round(delta_publish, 3),
                   "update_full_s": round(max(r["seconds"] for r in full_rows), 3),
                   "update_delta_s": round(max(r["seconds"] for r in delta_rows), 3),
                   "sync_full_s": round(full_publish + full_sync, 3),
                   "sync_delta_s": round(delta_publish + delta_sync, 3)}
            row["sync_ratio"] = round(row["sync_delta_s"] / row["sync_full_s"], 3)
            row["update_ratio"] = round(row["update_delta_s"] / row["update_full_s"], 3)
            rows.append(row)
            log(f"lr {lr:g} step {step}: {changed:.2%} of elements changed, delta {row['bytes_ratio']:.1%} of the "
                f"bytes ({delta.kind}, {row['load_path']}), "
                f"sync {row['sync_delta_s']:.2f} s vs {row['sync_full_s']:.2f} s")
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for lr in sorted({r["lr"] for r in rows}):
        mine = [r for r in rows if r["lr"] == lr]
        med = {k: statistics.median(r[k] for r in mine) for k in
               ("changed_elements", "bytes_ratio", "publish_full_s", "publish_delta_s", "update_full_s",
                "update_delta_s", "sync_full_s", "sync_delta_s")}
        deltas = [r for r in mine if r["kind"] == "delta"]
        out.append({"lr": lr, "steps": len(mine), "deltas": len(deltas), **med,
                    # each step's delta sync over the same step's full sync, the median; then over the steps that
                    # were deltas only; then the whole trajectory's time (the periodic full versions included)
                    "sync_ratio": round(statistics.median(r["sync_ratio"] for r in mine), 3),
                    "update_ratio": round(statistics.median(r["update_ratio"] for r in mine), 3),
                    "sync_ratio_delta_steps": round(statistics.median(r["sync_ratio"] for r in deltas), 3)
                    if deltas else None,
                    "sync_ratio_total": round(sum(r["sync_delta_s"] for r in mine)
                                              / sum(r["sync_full_s"] for r in mine), 3),
                    "server_read_ratio": round(statistics.median(r["server_read_delta"] / r["server_read_full"]
                                                                 for r in mine), 4)})
    return out


def child(lr: float, model: str, steps: int, out: Path) -> None:
    """One learning rate in a process of its own: a trainer's memory is not handed back to the system when it ends."""
    from flows.local import use_temporary_prefect

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        use_temporary_prefect(Path(tmp) / "prefect")
        from infer.config import get_config

        c = get_config(model)
        sizes = {"hidden_size": c.hidden, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
                 "num_key_value_heads": c.kv_heads, "intermediate_size": c.intermediate,
                 "max_position_embeddings": c.max_seq_len}
        out.write_text(json.dumps(run_lr(lr, sizes, steps, Path(tmp) / "run")))


def main() -> int:
    p = parser(__doc__, "the tiny model, 3 steps at one learning rate: a smoke test")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lrs", type=float, nargs="*", help="learning rates of the server trajectory (default 1e-6 3e-6 "
                   "1e-5; none: the library figures only)")
    p.add_argument("--library-mib", type=int, default=96, help="model size of the library figures")
    p.add_argument("--library-changed", type=float, default=0.02, help="share of elements a library delta changes")
    p.add_argument("--child-lr", type=float, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    model = "tiny" if args.quick else "medium"
    if args.child_lr is not None:
        child(args.child_lr, model, args.steps, args.child_out)
        return 0
    lrs, steps = ((1e-6,), 3) if args.quick else ((1e-6, 3e-6, 1e-5), args.steps)
    lrs = lrs if args.lrs is None else args.lrs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        library = library_apply(16 if args.quick else args.library_mib, 3 if args.quick else 15, Path(tmp),
                                args.library_changed)
        for lr in lrs:
            out = Path(tmp) / f"lr{lr:g}.json"
            subprocess.run([sys.executable, __file__, "--child-lr", str(lr), "--child-out", str(out), "--steps",
                            str(steps), *(["--quick"] if args.quick else [])], check=True)
            rows += json.loads(out.read_text())
    summary = summarise(rows)
    for s in summary:  # the update's floor, at this trajectory's model size and median density
        mib = round(statistics.median(r["full_bytes"] for r in rows if r["lr"] == s["lr"]) / 2**20)
        s["touch_floor_pair_s"] = round(touch_floor_pair(mib, s["changed_elements"]), 4)
        s["update_floor_ratio"] = round(s["touch_floor_pair_s"] / s["update_full_s"], 3)
        log(f"lr {s['lr']:g}: two servers touching {s['changed_elements']:.2%} of {mib} MiB at once: "
            f"{s['touch_floor_pair_s'] * 1e3:.1f} ms each, x{s['update_floor_ratio']} of the full update")
    print(f"\n{'lr':>7}{'changed':>9}{'delta/full bytes':>18}{'publish s (full/delta)':>24}"
          f"{'update s (full/delta)':>23}{'sync s (full/delta)':>21}{'sync ratio':>12}")
    for s in summary:
        print(f"{s['lr']:>7g}{s['changed_elements']:>9.2%}{s['bytes_ratio']:>18.1%}"
              f"{s['publish_full_s']:>12.2f}/{s['publish_delta_s']:<11.2f}{s['update_full_s']:>11.2f}/"
              f"{s['update_delta_s']:<11.2f}{s['sync_full_s']:>10.2f}/{s['sync_delta_s']:<10.2f}{s['sync_ratio']:>12.2f}")
    by_lr = {s["lr"]: s for s in summary}
    checks = {"library delta apply / full load, no sums passed": library["ratio_no_sums"],
              "library delta apply / full load, held sums passed": library["ratio_held_sums"]}
    if 1e-6 in by_lr:
        checks["delta bytes / full at lr 1e-6"] = by_lr[1e-6]["bytes_ratio"]
        checks["delta sync / full at lr 1e-6"] = by_lr[1e-6]["sync_ratio"]
        checks["delta update / full at lr 1e-6"] = by_lr[1e-6]["update_ratio"]
    if 1e-5 in by_lr:
        checks["delta sync / full at lr 1e-5"] = by_lr[1e-5]["sync_ratio"]
    verdicts = {k: {"value": v, "target": TARGETS[k], "met": v <= TARGETS[k]} for k, v in checks.items()}
    for k, v in verdicts.items():
        print(f"{k}: {v['value']:.3f} (target <= {v['target']}) {'met' if v['met'] else 'NOT met'}")
    write_results(results_path(args, "delta"), {
        "benchmark": "delta", "model": model, "dtype": "bfloat16", "servers": 2,
        "command": " ".join(["python bench/delta_bench.py", *sys.argv[1:]]),
        "machine": machine_info(), "library": library, "summary": summary, "targets": verdicts, "steps": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
