"""Scenario 3: ``baton serve`` SIGKILLed in the middle of ``POST /v1/update_weights``, then started again with the
same command line: it must serve one complete version, bit-exact (digest and seeded tokens)."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

from harness.chaos.servers import calibrate_update, judge_server, kill_during_update, publish_pair
from harness.chaos.tally import Tally
from harness.launch import free_port


def server_kills(tally: Tally, workdir: Path, trials: int, model: str, rng: random.Random,
                 part_bytes: int = 64 << 20, spread: float = 0.95, writing: bool = False) -> None:
    """SIGKILLs ``baton serve`` at a random moment of an update, restarts it with the same command line (same port)
    and checks it serves one complete version. Even trials run the README's command (no ``--version``: the newest
    committed, v2) and update to v1; odd ones pin ``--version v1`` and update to v2. The kill comes a random
    ``0..spread`` of the update's duration after the server reports the update in progress (with ``writing``:
    after it has begun writing the live weights)."""
    from harness.launch import baton_serve
    from infer.config import get_config

    root = str(workdir / "server-kill")
    digests = publish_pair(get_config(model), root, part_bytes=part_bytes, durable=False)
    tokens: dict[str, list[int]] = {}
    port, window = free_port(), None
    for t in range(trials):
        pinned = t % 2 == 1
        args = ["--model", model, "--port", str(port), *(["--version", "v1"] if pinned else [])]
        start, goal = ("v1", "v2") if pinned else ("v2", "v1")
        with baton_serve(root, *args, timeout=300) as server:
            before = judge_server(server.url, digests, tokens, max_tokens=2)
            if before != ("succeeded", start):
                tally.add("bad", f"before the kill: {before}")
                continue
            if window is None:
                window = calibrate_update(server.url, goal, start)
            box = kill_during_update(server.url, goal, rng.uniform(0, spread * window),
                                     lambda: os.kill(server.pid, signal.SIGKILL), writing)
        tally.faults += 1
        tally.note("killed mid-update" if box["killed_before_reply"] else "update answered before the kill")
        with baton_serve(root, *args, timeout=300) as server:
            kind, detail = judge_server(server.url, digests, tokens, max_tokens=2)
        tally.add(kind, detail)
        if kind == "succeeded":
            how = "--version v1" if pinned else "no --version (newest)"
            tally.note(f"restarted with {how}: serves {detail}, was serving {start} before the killed update")
    tally.note(f"update window {window or 0:.2f}s ({model})")
