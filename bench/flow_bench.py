#!/usr/bin/env python
"""End-to-end benchmark of the ``sync-weights`` flow against a raw copy of the same bytes, in one run.

A trainer checkpoint of the ``medium`` model (1.06 GiB, one ``paddle.save`` file) goes to two local inference
servers through ``sync-weights`` (publish as parts, both servers load and confirm). The run is split into:

- publish: the publish task's own seconds (read the checkpoint, write the parts, fsync, manifest);
- server load: the slower server's own update seconds (check, verify, write into its weights);
- orchestration: everything else in the flow's wall time (Prefect flow/task runs, HTTP, confirmation).

The baseline is a raw copy of the checkpoint file (read + write + fsync) in this process. Goal: the flow takes
at most 2x the raw copy plus 2 s of orchestration. Prefect's temporary server is started by a warm-up run
first; its start-up is reported apart.

    python bench/flow_bench.py            # about 3 minutes; writes bench/results/flow.json
    python bench/flow_bench.py --quick    # the small model, a smoke test; writes to a temp file
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", category=UserWarning)

from flows.local import use_temporary_prefect  # noqa: E402

use_temporary_prefect(os.environ.get("PREFECT_HOME") or tempfile.mkdtemp(prefix="baton-flow-bench-prefect-"))

import logging  # noqa: E402

import paddle  # noqa: E402

from common import log, machine_info, parser, results_path, write_results  # noqa: E402
from flows.sync import sync_weights  # noqa: E402
from infer.config import get_config  # noqa: E402
from infer.launch import baton_serve  # noqa: E402
from infer.model import random_state_dict  # noqa: E402

logging.getLogger("httpx").setLevel(logging.WARNING)


def raw_copy_seconds(src: Path, dst: Path) -> float:
    start = time.perf_counter()
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    seconds = time.perf_counter() - start
    dst.unlink()
    return seconds


def main() -> None:
    ap = parser(__doc__, "the small model: a smoke test")
    ap.add_argument("--model", help="model size (default medium, 1.06 GiB; --quick small)")
    ap.add_argument("--repeats", type=int, default=3, help="timed syncs, median kept (default 3)")
    ap.add_argument("--part-size", type=int, default=128 << 20, help="part bytes (default 128 MiB)")
    args = ap.parse_args()
    model = args.model or ("small" if args.quick else "medium")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="baton-flow-bench-") as tmp:
        work = Path(tmp)
        config = get_config(model)
        versions = [f"v{i}" for i in range(args.repeats + 1)]
        log(f"writing {len(versions)} trainer checkpoints of {model}")
        checkpoints = {}
        for i, version in enumerate(versions):
            ckpt = work / "trainer" / version
            ckpt.mkdir(parents=True)
            state = {k: paddle.to_tensor(v) for k, v in random_state_dict(config, seed=i).items()}
            paddle.save(state, str(ckpt / "model_state.pdparams"))
            del state
            checkpoints[version] = ckpt
        nbytes = (checkpoints["v0"] / "model_state.pdparams").stat().st_size
        snap = str(work / "snap")
        with baton_serve(snap, "--model", model, ready=False, timeout=600) as a, \
                baton_serve(snap, "--model", model, ready=False, timeout=600) as b:
            servers = [a.url, b.url]
            start = time.perf_counter()
            sync_weights("v0", snap, servers, source=str(checkpoints["v0"]), part_bytes=args.part_size)
            cold = time.perf_counter() - start
            log(f"warm-up sync (with Prefect's temporary server start): {cold:.2f}s")
            runs = []
            for version in versions[1:]:
                copy = raw_copy_seconds(checkpoints[version] / "model_state.pdparams", work / "raw-copy")
                start = time.perf_counter()
                rows = sync_weights(version, snap, servers, source=str(checkpoints[version]),
                                    part_bytes=args.part_size)
                wall = time.perf_counter() - start
                publish, load = rows[0]["publish_work_s"], max(r["seconds"] for r in rows)
                runs.append({"version": version, "raw_copy_s": copy, "flow_s": wall, "publish_s": publish,
                             "server_load_s": load, "orchestration_s": wall - publish - load})
                log(f"{version}: flow {wall:.2f}s = publish {publish:.2f} + load {load:.2f} + "
                    f"orchestration {wall - publish - load:.2f}; raw copy {copy:.2f}s")
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "version"}
    work_ratio = (med["publish_s"] + med["server_load_s"]) / med["raw_copy_s"]
    verdict = "ok" if med["flow_s"] <= 2 * med["raw_copy_s"] + 2 else "MISSES"
    print(f"\nsync-weights of {model} ({nbytes / (1 << 30):.2f} GiB) to 2 servers, median of {len(runs)}:")
    print(f"{'raw copy s':>11}{'flow s':>9}{'publish s':>11}{'load s':>9}{'orchestration s':>17}"
          f"{'(publish+load)/copy':>21}{'goal':>22}")
    print(f"{med['raw_copy_s']:>11.2f}{med['flow_s']:>9.2f}{med['publish_s']:>11.2f}{med['server_load_s']:>9.2f}"
          f"{med['orchestration_s']:>17.2f}{work_ratio:>20.2f}x{'<= 2x copy + 2 s: ' + verdict:>22}")
    out = results_path(args, "flow")
    write_results(out, {"machine": machine_info(), "model": model, "checkpoint_bytes": nbytes, "servers": 2,
                        "cold_first_sync_s": cold, "runs": runs, "median": med,
                        "publish_plus_load_over_copy": work_ratio, "verdict": verdict,
                        "goal": "flow_s <= 2 * raw_copy_s + 2", "total_seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
