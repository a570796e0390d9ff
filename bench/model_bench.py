#!/usr/bin/env python
"""Benchmark of the model and the weight-apply kernel on CPU, as ratios against baselines in the same run.

1. Greedy decoding tokens/s of the ``tiny`` and ``small`` configs with the KV cache, against recomputing the
   whole sequence for every new token (the same model, the same tokens): the cache's speed-up. bfloat16
   weights are timed too (this CPU build has no bfloat16 matmul, so each matmul upcasts its weight).
2. ``kernels.cast_copy_`` against ``paddle.assign(src.astype(dst.dtype), output=dst)`` writing 1 GiB of
   bfloat16 serving parameters from float32 trainer weights: time, and peak memory above what is already
   resident (each method in a fresh process), for many 16 MiB tensors and for one 1 GiB tensor.

    python bench/model_bench.py           # about 2 minutes; writes bench/results/model.json
    python bench/model_bench.py --quick   # small sizes, a smoke test; writes to a temp file
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", category=UserWarning)

import paddle  # noqa: E402
from common import log, machine_info, parser, proc_status_bytes, reset_peak_rss, results_path, write_results  # noqa: E402

import kernels  # noqa: E402
from infer.config import get_config  # noqa: E402
from infer.generate import SamplingParams, complete  # noqa: E402
from infer.model import build_model  # noqa: E402
from infer.tokenizer import encode  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
PROMPT = encode("The weights arrive; the policy improves. ")


def decode_rows(sizes: list[str], new_tokens: int) -> list[dict]:
    rows = []
    for name in sizes:
        for dtype in ("float32", "bfloat16"):
            model = build_model(get_config(name, dtype=dtype), seed=0)
            params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
            complete(model, PROMPT, SamplingParams(max_tokens=2))  # warm-up
            start = time.perf_counter()
            cached = complete(model, PROMPT, params).tokens
            cached_s = time.perf_counter() - start
            row = {"model": name, "dtype": dtype, "tokens": len(cached), "cached_tok_s": len(cached) / cached_s}
            if dtype == "float32":
                ids, start = list(PROMPT), time.perf_counter()
                for _ in cached:
                    logits = model(paddle.to_tensor([ids], dtype="int64"))[0, -1].numpy()
                    ids.append(int(np.argmax(logits)))
                uncached_s = time.perf_counter() - start
                if ids[len(PROMPT):] != cached:
                    raise AssertionError(f"{name}: cached and uncached greedy decoding disagree")
                row |= {"uncached_tok_s": len(cached) / uncached_s, "ratio": uncached_s / cached_s}
            log(f"decode {name} {dtype}: {row['cached_tok_s']:.1f} tok/s")
            rows.append(row)
    return rows


def layout(total: int, tensor_bytes: int) -> list[int]:
    """Element counts of bfloat16 tensors adding up to ``total`` bytes."""
    return [tensor_bytes // 2] * (total // tensor_bytes)


def child(method: str, total: int, tensor_bytes: int) -> None:
    """In a fresh process: apply float32 sources to bfloat16 parameters, report seconds and peak RSS added."""
    sizes = layout(total, tensor_bytes)
    srcs = [paddle.randn([n], dtype="float32") for n in sizes]
    dsts = [paddle.zeros([n], dtype="bfloat16") for n in sizes]

    def apply() -> None:
        for dst, src in zip(dsts, srcs):
            if method == "cast_copy_":
                kernels.cast_copy_(dst, src)
            else:
                paddle.assign(src.astype(dst.dtype), output=dst)

    apply()  # warm-up, and the check below
    want = srcs[0][:1000].astype("bfloat16").view(paddle.uint16).numpy()
    assert np.array_equal(dsts[0][:1000].view(paddle.uint16).numpy(), want)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        apply()
        best = min(best, time.perf_counter() - start)
    before = reset_peak_rss()
    apply()
    print(json.dumps({"seconds": best, "peak_added": proc_status_bytes("VmHWM") - before}))


def cast_rows(total: int, layouts: list[int]) -> list[dict]:
    rows = []
    for tensor_bytes in layouts:
        got = {}
        for method in ("cast_copy_", "assign+astype"):
            out = subprocess.run([sys.executable, __file__, "--child", method, "--total", str(total),
                                  "--tensor-bytes", str(tensor_bytes)], capture_output=True, text=True, check=True)
            got[method] = json.loads(out.stdout.strip().splitlines()[-1])
        new, old = got["cast_copy_"], got["assign+astype"]
        rows.append({"params_bytes": total, "tensor_bytes": tensor_bytes, "cast_copy_s": new["seconds"],
                     "assign_astype_s": old["seconds"], "speed_ratio": old["seconds"] / new["seconds"],
                     "cast_copy_peak_MiB": new["peak_added"] / MiB, "assign_astype_peak_MiB": old["peak_added"] / MiB})
        log(f"cast {tensor_bytes // MiB} MiB tensors: {rows[-1]['speed_ratio']:.2f}x")
    return rows


def table(decode: list[dict], cast: list[dict]) -> str:
    lines = ["greedy decode on CPU (tokens/s)",
             f"{'model':<7}{'dtype':<10}{'KV cache':>10}{'recompute':>11}{'ratio':>8}"]
    for r in decode:
        unc = f"{r['uncached_tok_s']:.1f}" if "uncached_tok_s" in r else "-"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        lines.append(f"{r['model']:<7}{r['dtype']:<10}{r['cached_tok_s']:>10.1f}{unc:>11}{ratio:>8}")
    lines += ["", "weight apply, float32 -> bfloat16 parameters (speed ratio > 1: cast_copy_ is faster)",
              f"{'params':>8}{'tensor':>10}{'cast_copy_ s':>14}{'assign+astype s':>17}{'ratio':>8}"
              f"{'peak+ cast_copy_':>18}{'peak+ assign':>14}"]
    for r in cast:
        lines.append(f"{r['params_bytes'] / GiB:>6.2f}Gi{r['tensor_bytes'] / MiB:>8.0f}Mi{r['cast_copy_s']:>14.3f}"
                     f"{r['assign_astype_s']:>17.3f}{r['speed_ratio']:>7.2f}x"
                     f"{r['cast_copy_peak_MiB']:>15.1f}MiB{r['assign_astype_peak_MiB']:>11.1f}MiB")
    return "\n".join(lines)


def main() -> None:
    ap = parser(__doc__, "small sizes: a smoke test")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--total", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tensor-bytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.total, args.tensor_bytes)
    started = time.perf_counter()
    total = 64 * MiB if args.quick else GiB
    decode = decode_rows(["tiny"] if args.quick else ["tiny", "small"], 8 if args.quick else 64)
    cast = cast_rows(total, [16 * MiB, total])
    print(table(decode, cast))
    out = results_path(args, "model")
    write_results(out, {"machine": machine_info(), "quick": args.quick, "prompt_tokens": len(PROMPT),
                        "decode": decode, "weight_apply": cast, "total_seconds": time.perf_counter() - started})


if __name__ == "__main__":
    main()
