"""Scenario 1: a publisher SIGKILLed at random moments. Afterwards every committed version loads bit-exact, every
uncommitted one is refused (no torn load), and every version committed before the kill still loads."""

from __future__ import annotations

import os
import random
import signal
import time

import storage
from harness.chaos.loads import expected, fill, judge_load, paddle_target, version_id, version_state
from harness.chaos.processes import gone, publisher_zygote
from harness.chaos.tally import Tally
from harness.launch import wait_until


def kill_stage(names: set[str], k: int) -> str:
    """Where the publish of version ``k`` was when the kill landed, from the files it left."""
    base = f"model_state.tp0.{version_id(k)}"
    manifest, marker = f"{base}.manifest.json" in names, f"{base}.publishing" in names
    parts = sum(1 for n in names if n.startswith(base + ".part"))
    if manifest:
        return "after the manifest, marker not yet removed" if marker else "between publishes"
    if marker:
        return f"mid-publish ({parts} part files written)" if parts else "marker written, no part yet"
    return "before its first write" if not parts else f"parts without marker or manifest ({parts})"


def check_version(root: str, k: int, scale: int, committed: bool, target: dict, pattern: dict) -> tuple[str, str]:
    """A committed version must load bit-exact; an uncommitted one must be refused with the target untouched."""
    fill(target, pattern)
    kind, detail = judge_load(lambda: storage.load_snapshot(root, version_id(k), into=target), target,
                              {version_id(k): expected(k, scale)})
    if committed and kind != "succeeded":
        return "bad", f"lost: committed {version_id(k)} does not load ({kind}: {detail})"
    if not committed and kind == "succeeded":
        return "bad", f"torn: uncommitted {version_id(k)} loaded"
    return kind, detail


def publisher_kills(tally: Tally, root: str, kills: int, rng: random.Random, scale: int = 160,
                    part_bytes: int = 256 << 10, sweep_max: int = 1000) -> None:
    """SIGKILLs ``kills`` publishers at uniformly random moments of a back-to-back publish loop, and after each
    checks every version it touched plus the newest one committed before it; at the end, up to ``sweep_max``
    of all the committed versions again."""
    fs, path = storage.open_fs(root)
    for _ in range(2):  # the second one is warm, as a publisher's are once connected
        start = time.perf_counter()
        storage.publish(version_state(0, scale), root + "-warm", "warm", part_bytes=part_bytes, overwrite=True)
    window = 2.0 * (time.perf_counter() - start)  # kills fall anywhere in a publish and the start of the next
    target, pattern = paddle_target(version_state(0, scale))
    committed: list[int] = []
    k = 0
    with publisher_zygote() as spawn:
        for _ in range(kills):
            pid = spawn(root, k, scale, part_bytes)
            time.sleep(rng.uniform(0, window))
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: gone(pid), 10, f"killed publisher {pid}", 0.002)
            tally.faults += 1
            names = set(storage.listing(fs, path))
            last = k
            while any(n.startswith(f"model_state.tp0.{version_id(last + 1)}.") for n in names):
                last += 1
            tally.note(f"killed: {kill_stage(names, last)}")
            earlier = committed[-1] if committed else None
            for j in range(k, last + 1):
                done = f"model_state.tp0.{version_id(j)}.manifest.json" in names
                tally.add(*check_version(root, j, scale, done, target, pattern))
                if done:
                    committed.append(j)
            if earlier is not None:
                tally.add(*check_version(root, earlier, scale, True, target, pattern))
            k = last + 1 if f"model_state.tp0.{version_id(last)}.manifest.json" in names else last
    sweep = committed[:: max(1, len(committed) // sweep_max)]
    for j in sweep:  # nothing committed before any of the kills was lost
        tally.add(*check_version(root, j, scale, True, target, pattern))
    tally.note(f"versions committed across the kills: {len(committed)}, {len(sweep)} loaded again at the end")
