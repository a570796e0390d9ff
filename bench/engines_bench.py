#!/usr/bin/env python
"""Benchmark of putting a version where FastDeploy and SGLang read it, against a plain copy of the same bytes.

1. FastDeploy staging (``storage.fastdeploy.export_fastdeploy``: read and check every part against its manifest,
   fuse q|k|v and gate|up, split for each worker, write FastDeploy's parts, move them in) for one worker and for
   two, snapshot and model directory on one filesystem, vs ``shutil.copyfile`` of the version's part files (the
   kernel's copy, what ``cp`` does).
2. The same from tmpfs (``/dev/shm``) to disk.
3. SGLang export (``export_hf_dir``: read, check, transpose the Linear weights, write shards, index and config)
   vs the same copy.

The model is a Qwen2 of the "medium" sizes (1.06 GiB in float32). Every file is read once before timing, so the
page cache is equally warm for every method; timings are the best of ``--repeats``. Results go to a table and to
``bench/results/engines.json``.

    python bench/engines_bench.py            # the 1 GiB model (~3 min)
    python bench/engines_bench.py --quick    # a tiny model, a smoke test
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import log, machine_info, parser, results_path, write_results  # noqa: E402


def paired(fn, copy, repeats: int, fresh) -> dict[str, float]:
    """Best times of ``fn(target)`` and ``copy(target)`` over fresh, empty targets, run in turns (which goes first
    alternates), each after ``os.sync()``: this disk writes a burst fast, then at its sustained rate, so only runs
    side by side compare. ``*_cached_s``: until the call returns (bytes in the page cache); ``*_s``: until
    ``os.sync()`` returns too (bytes on disk, what a server reading them after a reboot needs)."""
    times: dict[str, list[float]] = {"baton_cached_s": [], "baton_s": [], "copy_cached_s": [], "copy_s": []}
    for i in range(repeats):
        for name, method in (("baton", fn), ("copy", copy))[:: 1 if i % 2 == 0 else -1]:
            target = fresh()
            os.sync()
            start = time.perf_counter()
            method(target)
            times[f"{name}_cached_s"].append(time.perf_counter() - start)
            os.sync()
            times[f"{name}_s"].append(time.perf_counter() - start)
            shutil.rmtree(target)
    return {k: round(min(v), 3) for k, v in times.items()}


def copy_all(files: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, target / f.name)


def main() -> int:
    args = parser(__doc__, "the tiny model, one repeat: a smoke test").parse_args()
    import numpy as np

    import storage
    from infer.config import get_config
    from infer.hf import config_from_hf
    from infer.model import random_state_dict
    from storage.fastdeploy import export_fastdeploy
    from storage.hfexport import export_hf_dir

    name, repeats = ("tiny", 1) if args.quick else ("medium", 3)
    c = get_config(name)
    part_bytes = (64 << 10) if args.quick else (256 << 20)
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": c.hidden,
             "num_hidden_layers": c.layers, "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads,
             "intermediate_size": c.intermediate, "vocab_size": c.vocab_size,
             "max_position_embeddings": c.max_seq_len, "rms_norm_eps": 1e-6, "torch_dtype": "float32",
             "tie_word_embeddings": False}
    config = json.dumps(qwen2).encode()
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as disk, tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        log(f"publishing a Qwen2 of the {name} sizes on disk and on tmpfs")
        state = random_state_dict(config_from_hf(qwen2), 0)
        assert all(a.dtype == np.float32 for a in state.values())
        roots = {"disk": Path(disk) / "snap", "tmpfs": Path(shm) / "snap"}
        for root in roots.values():
            storage.publish(state, str(root), "v1", part_bytes=part_bytes)
        del state
        counter = iter(range(10_000))

        def fresh() -> Path:
            target = Path(disk) / f"out-{next(counter)}"
            target.mkdir()
            (target / "config.json").write_bytes(config)
            return target

        def row(step: str, size: int, fn, files: list[Path]) -> None:
            r = paired(fn, lambda t: copy_all(files, t), repeats, fresh)
            rows.append({"step": step, "bytes": size, **r, "ratio": round(r["baton_s"] / r["copy_s"], 2),
                         "ratio_cached": round(r["baton_cached_s"] / r["copy_cached_s"], 2)})
            log(f"{rows[-1]}")

        for where, root in roots.items():
            files = sorted(root.glob("*.part*.pdparams"))
            size = sum(f.stat().st_size for f in files)
            for f in files:
                f.read_bytes()  # warm the page cache for both methods
            for ids in ([0], [0, 1]) if where == "disk" else ([0],):
                row(f"FastDeploy staging, {len(ids)} worker{'s' * (len(ids) > 1)}, {where}", size,
                    lambda t, ids=ids: export_fastdeploy(str(root), "v1", str(t), ids), files)
            if where == "disk":
                row("SGLang export (transposed shards)", size,
                    lambda t: export_hf_dir(str(root), "v1", str(t / "exports"), config), files)
    doc = {"machine": machine_info(), "model": f"Qwen2 of the {name} sizes", "part_bytes": part_bytes,
           "repeats": repeats, "rows": rows}
    print(f"\n{'step':<42} {'GiB':>5} {'Baton s':>8} {'copy s':>7} {'ratio':>6}   {'in page cache':>13}")
    for r in rows:
        print(f"{r['step']:<42} {r['bytes'] / (1 << 30):>5.2f} {r['baton_s']:>8.3f} {r['copy_s']:>7.3f} "
              f"{r['ratio']:>5.2f}x   {r['baton_cached_s']:.3f} / {r['copy_cached_s']:.3f} = {r['ratio_cached']:.2f}x")
    write_results(results_path(args, "engines"), doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
