#!/usr/bin/env python
"""Benchmark of putting a version where FastDeploy and SGLang read it, against a plain copy of the same bytes.

1. FastDeploy staging, snapshot and model directory on one filesystem: ``storage.export.stage_fastdeploy``
   (hard links, each part hashed against its manifest, renames) vs ``shutil.copyfile`` of the same part files
   (the kernel's copy, what ``cp`` does).
2. The same across filesystems (snapshot on tmpfs ``/dev/shm``, model directory on disk): Baton copies and
   hashes, the baseline copies.
3. SGLang export (``export_hf_dir``: read, check, transpose the Linear weights, write shards, index and config)
   vs the copy of the same files on one filesystem.

Every file is read once before timing, so the page cache is equally warm for every method; timings are the best
of ``--repeats``. Results go to a table and to ``bench/results/engines.json``.

    python bench/engines_bench.py            # the 1 GiB "medium" model, float32 (~2 min)
    python bench/engines_bench.py --quick    # the tiny model, a smoke test
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import log, machine_info, parser, results_path, write_results  # noqa: E402


def best(fn, repeats: int, fresh) -> float:
    """Best wall time of ``fn(target)`` over fresh, empty targets."""
    times = []
    for _ in range(repeats):
        target = fresh()
        start = time.perf_counter()
        fn(target)
        times.append(time.perf_counter() - start)
    return min(times)


def copy_all(files: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, target / f.name)


def main() -> int:
    args = parser(__doc__, "the tiny model, one repeat: a smoke test").parse_args()
    import storage
    from infer.config import get_config
    from infer.model import random_state_dict
    from storage.export import export_hf_dir, stage_fastdeploy

    name, repeats = ("tiny", 1) if args.quick else ("medium", 3)
    config = get_config(name)
    part_bytes = (64 << 10) if args.quick else (256 << 20)
    hf_config = json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": config.hidden}).encode()
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as disk, tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        log(f"publishing {name} on disk and on tmpfs")
        state = random_state_dict(config, 0)
        roots = {"disk": Path(disk) / "snap", "tmpfs": Path(shm) / "snap"}
        for root in roots.values():
            storage.publish(state, str(root), "v1", part_bytes=part_bytes)
        del state
        counter = iter(range(10_000))

        def fresh() -> Path:
            return Path(disk) / f"out-{next(counter)}"

        for where, root in roots.items():
            files = sorted(root.glob("*.part*.pdparams"))
            size = sum(f.stat().st_size for f in files)
            for f in files:
                f.read_bytes()  # warm the page cache for both methods
            copy = best(lambda t: copy_all(files, t), repeats, fresh)
            what = "same filesystem (hard links)" if where == "disk" else "tmpfs to disk (copies)"
            staged = best(lambda t: stage_fastdeploy(str(root), "v1", str(t), [0]), repeats, fresh)
            rows.append({"step": f"FastDeploy staging, {what}", "bytes": size, "baton_s": round(staged, 3),
                         "copy_s": round(copy, 3), "ratio": round(staged / copy, 2)})
            log(f"{rows[-1]}")
            if where == "disk":
                exported = best(lambda t: export_hf_dir(str(root), "v1", str(t), hf_config), repeats, fresh)
                rows.append({"step": "SGLang export (transposed shards)", "bytes": size,
                             "baton_s": round(exported, 3), "copy_s": round(copy, 3),
                             "ratio": round(exported / copy, 2)})
                log(f"{rows[-1]}")
    doc = {"machine": machine_info(), "model": name, "part_bytes": part_bytes, "repeats": repeats, "rows": rows}
    print(f"\n{'step':<46} {'GiB':>6} {'Baton s':>8} {'copy s':>8} {'ratio':>6}")
    for r in rows:
        print(f"{r['step']:<46} {r['bytes'] / (1 << 30):>6.2f} {r['baton_s']:>8.3f} {r['copy_s']:>8.3f} "
              f"{r['ratio']:>5.2f}x")
    write_results(results_path(args, "engines"), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
