"""``baton demo``: the main job on the embedded default (local storage, a temporary local Prefect, inference
servers on 127.0.0.1), all started here and stopped at the end. See ``demo/rl.py`` for the loop itself."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from infer.config import CONFIGS


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="an RL loop whose policy improves as weights flow trainer -> Prefect -> "
                                    "storage -> inference server", description=__doc__)
    p.add_argument("--dir", default="runs/demo", help="run directory, replaced on each run (default runs/demo)")
    p.add_argument("--steps", type=int, default=12, help="training steps (default 12)")
    p.add_argument("--model", default="tiny", choices=sorted(CONFIGS), help="policy size (default tiny)")
    p.add_argument("--model-dir", metavar="DIR",
                   help="start from a Hugging Face model directory (Llama, Mistral, Qwen2, Qwen3, ERNIE-4.5) and use "
                        "its tokenizer; a local DIR without config.json gets a tiny random Qwen2 with a BPE "
                        "tokenizer trained on the spot")
    p.add_argument("--storage", help="snapshot root URL (default DIR/snapshots; s3://bucket/prefix works)")
    p.add_argument("--servers", type=int, default=1, help="inference servers to fan out to (default 1)")
    p.add_argument("--async", dest="async_mode", action="store_true",
                   help="sample the next step while the previous sync is in flight (staleness at most 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the policy and the sampling (default 0)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    p.add_argument("--delta", action="store_true",
                   help="serve bf16 and publish the trainer's bf16 copy of its float32 master weights, each step as a "
                        "delta on the previous one: only the changed bf16 elements are written and read (a step where "
                        "a delta would not pay is published in full and says why; the table's kind and bytes show it)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from demo import rl

    run_dir = Path(args.dir).resolve()
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    model_dir = args.model_dir
    if model_dir and "://" not in model_dir and not (Path(model_dir) / "config.json").exists():
        from demo.tiny_model import write_tiny_qwen2

        model_dir = str(write_tiny_qwen2(Path(model_dir).resolve(), args.seed))
        print(f"{args.model_dir} has no config.json: wrote a tiny random Qwen2 there (BPE tokenizer trained now)")
    policy = Path(model_dir).name if model_dir else args.model
    print(f"Baton RL demo: the {policy} policy learns to answer with digits. Rollouts come from "
          f"{args.servers} inference server(s); after each step the trainer's weights go out through the "
          f"sync-weights flow ({'async' if args.async_mode else 'sync'} mode). Run directory: {run_dir}", flush=True)
    start = time.perf_counter()
    records = rl.run(run_dir, steps=args.steps, model=args.model, storage_url=args.storage, servers=args.servers,
                     async_mode=args.async_mode, lr=args.lr, seed=args.seed, model_dir=model_dir, delta=args.delta)
    rl.write_outputs(records, run_dir)
    print(rl.table(records))
    first, last = records[0].reward_mean, records[-1].reward_mean
    snapshots = args.storage or run_dir / "snapshots"
    print(f"reward {first:.3f} -> {last:.3f} in {args.steps} steps ({time.perf_counter() - start:.0f}s). "
          f"Plot: {run_dir / 'reward.png'}; steps: {run_dir / 'steps.json'}; "
          f"snapshots: `baton versions {snapshots}`, `baton inspect {snapshots} --version step_{args.steps}`; "
          f"Prefect records: {run_dir / 'prefect'}")
    if last <= first:
        print("the reward did not improve: try more --steps (a few steps in --async mode mostly train on "
              "one-version-stale samples)")
    return 0
