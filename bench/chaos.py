#!/usr/bin/env python
"""Fault injection, every scenario of ``harness/chaos/`` with its tally of outcomes (the goal: 0 bad).

    python bench/chaos.py             # every scenario, about 6 minutes on 2 cores; writes bench/results/chaos.json
    python bench/chaos.py --quick     # a few faults of each kind; writes to a temp file
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore", category=UserWarning)  # Paddle's warnings would interleave with the report

from bench.common import log, machine_info, parser, results_path, write_results  # noqa: E402
from harness.chaos import (  # noqa: E402
    BUCKET,
    KINDS,
    Tally,
    byte_flips,
    header_name_duplicate,
    moto_s3,
    prefect_restarts,
    prune_race,
    publisher_kills,
    replace_race,
    s3_kills,
    server_kills,
    timed,
)

# ---- the run --------------------------------------------------------------------------------------------------

def run(args, workdir: Path) -> list[Tally]:
    rng = random.Random(args.seed)
    tallies: list[Tally] = []

    def scenario(name: str) -> Tally:
        tallies.append(Tally(name))
        return tallies[-1]

    with timed(scenario("publisher SIGKILL, local disk")) as t:
        publisher_kills(t, str(workdir / "kill-local"), args.kills, rng)
    with moto_s3():
        with timed(scenario("publisher SIGKILL, loopback S3")) as t:
            # every S3 load opens a new S3FileSystem (about 0.3 s here): a sample of the final sweep
            publisher_kills(t, f"s3://{BUCKET}/kill", args.kills, rng, scale=40, part_bytes=64 << 10, sweep_max=10)
        with timed(scenario("prune racing loads, S3, verify=full")) as t:
            prune_race(t, f"s3://{BUCKET}/prune", args.race_loads // 10, "full")
        with timed(scenario("S3 object replaced during loads, verify=stream")) as t:
            replace_race(t, f"s3://{BUCKET}/replace", "object", args.race_loads // 10, "stream")
    for mask, verify, text_only in ((0xFF, "full", False), (0xFF, "stream", False), (0x01, "full", True),
                                    (0x01, "stream", True)):
        what = "every byte" if not text_only else "manifest + headers"
        with timed(scenario(f"byte flips ^{mask:#04x}, {what}, verify={verify}")) as t:
            byte_flips(t, workdir, mask, verify, args.flip_stride, text_only)
    for verify in ("full", "stream"):
        with timed(scenario(f"prune racing loads, local, verify={verify}")) as t:
            prune_race(t, str(workdir / f"prune-{verify}"), args.race_loads, verify)
    for mode, verify in (("overwrite", "full"), ("overwrite", "stream"), ("rename", "full")):
        with timed(scenario(f"part {'rewritten in place' if mode == 'overwrite' else 'renamed over'} during loads, "
                            f"verify={verify}")) as t:
            replace_race(t, str(workdir / f"replace-{mode}-{verify}"), mode, args.race_loads, verify)
    with timed(scenario(f"baton serve SIGKILL mid-update ({args.server_model}), restart")) as t:
        server_kills(t, workdir, args.server_kills, args.server_model, rng)
    with timed(scenario(f"S3 server SIGKILL mid-update ({args.s3_model}), restart S3, update again")) as t:
        t.statuses = s3_kills(t, args.s3_kills, args.s3_model, rng)
    if args.prefect_trials:
        with timed(scenario("Prefect server SIGKILL + restart during sync-weights, rerun")) as t:
            prefect_restarts(t, workdir, args.prefect_trials, rng)
    return tallies


def print_table(tallies: list[Tally]) -> None:
    head = ["scenario", "faults", "checks", "succeeded", "refused-clean", "harmless", "detected-partial", "BAD"]
    rows = [[t.scenario, t.faults, t.checks, *(t.counts[k] for k in KINDS)] for t in tallies]
    rows.append(["total", sum(t.faults for t in tallies), sum(t.checks for t in tallies),
                 *(sum(t.counts[k] for t in tallies) for k in KINDS)])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for t in tallies:
        for example in t.bad_examples:
            print(f"BAD in {t.scenario}: {example}")


def main() -> None:
    ap = parser(__doc__, "a few faults of each kind (about 2 minutes)")
    ap.add_argument("--kills", type=int, default=50, help="publisher SIGKILLs per backend (default 50)")
    ap.add_argument("--flip-stride", type=int, default=1, help="flip every Nth tensor-data byte (default 1: all)")
    ap.add_argument("--race-loads", type=int, default=200, help="loads per local race scenario (S3: a tenth)")
    ap.add_argument("--server-kills", type=int, default=4, help="baton serve SIGKILLs mid-update (default 4)")
    ap.add_argument("--server-model", default="medium", help="model the server kills update (default medium, 1 GiB)")
    ap.add_argument("--s3-kills", type=int, default=4, help="S3 server SIGKILLs mid-update (default 4)")
    ap.add_argument("--s3-model", default="small", help="model loaded from S3 (default small, 96 MiB)")
    ap.add_argument("--prefect-trials", type=int, default=2, help="Prefect restarts during sync-weights (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.kills, args.flip_stride, args.race_loads, args.server_kills, args.s3_kills = 5, 97, 40, 1, 1
        args.server_model, args.prefect_trials = "small", min(args.prefect_trials, 1)
    import logging

    for name in ("httpx", "botocore.credentials"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("baton.storage").setLevel(logging.ERROR)  # "a higher level is torn": what flips are for
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="baton-chaos-") as tmp:
        workdir = Path(tmp)
        tallies = run(args, workdir)
        extra = {"duplicate_header_name_verify_none": header_name_duplicate(workdir)}
    seconds = time.perf_counter() - start
    print_table(tallies)
    doc = {"machine": machine_info(), "seconds": round(seconds, 1), "args": vars(args) | {"out": str(args.out)},
           "command": "python bench/chaos.py" + (" --quick" if args.quick else ""),
           "scenarios": [t.to_json() | ({"statuses": t.statuses} if hasattr(t, "statuses") else {}) for t in tallies],
           "totals": {"faults": sum(t.faults for t in tallies), "checks": sum(t.checks for t in tallies),
                      **{k: sum(t.counts[k] for t in tallies) for k in KINDS}},
           "findings": extra}
    write_results(results_path(args, "chaos"), doc)
    log(f"chaos: {seconds:.0f}s, {doc['totals']}")


if __name__ == "__main__":
    main()
