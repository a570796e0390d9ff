"""Scenario 5: loads racing another process that prunes versions, or that replaces a part (rewritten in place,
renamed over, or a new S3 object under the same key). Every load is bit-exact, refused with the target
untouched, or a ``PartialApplyError`` naming every tensor it changed."""

from __future__ import annotations

import time

import storage
from harness.chaos.loads import expected, fill, judge_load, paddle_target, version_id, version_state
from harness.chaos.processes import racing
from harness.chaos.tally import Tally


def prune_race(tally: Tally, root: str, loads: int, verify: str, scale: int = 32, part_bytes: int = 48 << 10,
               max_seconds: float = 120) -> None:
    """Loads the oldest listed version again and again while another process publishes a new one and prunes to
    the newest two after each publish: every load is bit-exact or refused; afterwards the newest version loads."""
    target, pattern = paddle_target(version_state(0, scale))
    deadline = time.monotonic() + max_seconds
    with racing("racer", root, str(scale), str(part_bytes), "2"):
        while tally.checks < loads and time.monotonic() < deadline:
            try:
                versions = storage.list_versions(root)
            except Exception as exc:  # noqa: BLE001 - listing while a prune deletes manifests
                tally.note(f"list_versions raised {type(exc).__name__}")
                continue
            if not versions:
                tally.note("no version listed")
                time.sleep(0.01)
                continue
            oldest = versions[0].version
            fill(target, pattern)
            tally.faults += 1
            kind, detail = judge_load(lambda: storage.load_snapshot(root, oldest, into=target, verify=verify),
                                      target, {oldest: expected(int(oldest[1:]), scale)})
            tally.add(kind, detail)
            if kind != "succeeded":
                tally.note(f"{kind}: {detail}")
    newest = storage.list_versions(root)[-1].version
    fill(target, pattern)
    kind, detail = judge_load(lambda: storage.load_snapshot(root, newest, into=target, verify=verify), target,
                              {newest: expected(int(newest[1:]), scale)})
    tally.add(kind if kind == "succeeded" else "bad", f"rerun after the race: {kind} {detail}")
    tally.note(f"rerun after the race: {kind}")


def replace_race(tally: Tally, root: str, mode: str, loads: int, verify: str, scale: int = 48,
                 part_bytes: int = 64 << 10) -> None:
    """Loads version p00001 again and again while another process swaps one of its parts for the same part of
    p00002 (same size, same header, other data) and back: every load is p00001 bit-exact, refused, or a
    ``PartialApplyError`` naming every changed tensor; once the writer stops, the load succeeds again."""
    for k in (1, 2):
        storage.publish(version_state(k, scale), root, version_id(k), part_bytes=part_bytes, overwrite=True)
    count = len(storage.resolve(root, version_id(1)).files)
    target, pattern = paddle_target(version_state(1, scale))
    want = {version_id(1): expected(1, scale)}
    with racing("rewriter", root, mode, str(count)):
        for _ in range(loads):
            fill(target, pattern)
            tally.faults += 1
            kind, detail = judge_load(lambda: storage.load_snapshot(root, version_id(1), into=target, verify=verify),
                                      target, want)
            tally.add(kind, detail)
            if kind != "succeeded":
                tally.note(f"{kind}: {detail[:80]}")
    storage.publish(version_state(1, scale), root, version_id(1), part_bytes=part_bytes, overwrite=True)
    fill(target, pattern)
    kind, detail = judge_load(lambda: storage.load_snapshot(root, version_id(1), into=target, verify=verify),
                              target, want)
    tally.add(kind if kind == "succeeded" else "bad", f"load after the writer stopped: {kind} {detail}")
