"""``baton demo``: the whole handoff on one machine, on the embedded default. A local snapshot directory, a
temporary local Prefect, and one inference server on 127.0.0.1, all started here and stopped at the end.

A trainer checkpoint (Paddle's own ``paddle.save`` format) goes through the ``sync-weights`` flow: it is
published as parts, the server loads it with the fallback order and confirms it. Then a completion shows which
version answered. Two checkpoints go through in turn, so the second shows a live update.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

from infer.config import CONFIGS
from storage.cli import human, parse_size

STEPS = 5


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default (local storage, local Prefect, "
                                    "one inference server)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="runs/demo", help="run directory, replaced on each run (default runs/demo)")
    p.add_argument("--model", default="small", choices=sorted(CONFIGS), help="model size (default small)")
    p.add_argument("--part-size", type=parse_size, default=parse_size("32MiB"), help="part size (default 32MiB)")
    p.set_defaults(func=main)


def say(step: int, text: str) -> None:
    print(f"[{step}/{STEPS}] {text}", flush=True)


def main(args: argparse.Namespace) -> int:
    run = Path(args.dir).resolve()
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    os.environ["PREFECT_HOME"] = str(run / "prefect")  # the flow records stay with the run
    os.environ.pop("PREFECT_API_URL", None)  # no server configured: Prefect starts a temporary local one
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # this script prints what matters; the UI has more

    import httpx
    import paddle

    from flows.sync import sync_weights
    from infer.config import get_config
    from infer.launch import baton_serve
    from infer.model import random_state_dict

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise

    snapshots = run / "snapshots"
    config = get_config(args.model)
    say(1, f"writing two trainer checkpoints of the {config.name} model "
           f"({config.num_parameters() / 1e6:.1f}M parameters) under {run / 'trainer'}")
    checkpoints = []
    for step in (1, 2):
        ckpt = run / "trainer" / f"step_{step}"
        ckpt.mkdir(parents=True)
        state = {k: paddle.to_tensor(v) for k, v in random_state_dict(config, seed=step).items()}
        paddle.save(state, str(ckpt / "model_state.pdparams"))
        checkpoints.append((f"step_{step}", str(ckpt)))
    say(2, "starting an inference server on 127.0.0.1 (no weights yet: /health answers 503)")
    with baton_serve(str(snapshots), "--model", config.name, ready=False, timeout=300) as server:
        print(f"      {server.url}", flush=True)
        for i, (version, source) in enumerate(checkpoints):
            say(3 + i, f"sync-weights {version}: publish {source} in parts of {human(args.part_size)}, "
                       "load on the server, confirm")
            start = time.perf_counter()
            rows = sync_weights(version, str(snapshots), [server.url], source=source, part_bytes=args.part_size)
            first = ", with the temporary Prefect server's start" if i == 0 else ""
            for r in rows:
                print(f"      {r['url']}: {r['status']} {r['version']}, {r['message']}, {human(r['bytes'])} "
                      f"loaded in {r['seconds']:.2f}s (publish {r['publish_s']:.2f}s, whole flow "
                      f"{time.perf_counter() - start:.2f}s{first}", flush=True)
            reply = httpx.post(f"{server.url}/v1/completions", timeout=120,
                               json={"prompt": "Weights in flight:", "max_tokens": 24, "temperature": 0}).json()
            print(f"      completion from weight_version={reply['weight_version']}: "
                  f"{reply['choices'][0]['text']!r}", flush=True)
        say(5, f"stopping the server; snapshots stay in {snapshots}")
    print(f"done. Inspect with `baton versions {snapshots}` and `baton inspect {snapshots} --id step_2`; "
          f"Prefect's records are in {run / 'prefect'}")
    return 0
