"""Publishes and prunes against loads (``python -m harness.chaos.racer ROOT SCALE PART_BYTES KEEP``): versions
``p00000``, ``p00001``, … back to back, pruning to the newest ``KEEP`` after each; prints ``ready`` after the
first, and runs until it is killed."""

from __future__ import annotations

import sys

import storage
from harness.chaos.loads import version_id, version_state


def main(root: str, scale: int, part_bytes: int, keep: int) -> None:
    k = 0
    while True:
        storage.publish(version_state(k, scale), root, version_id(k), part_bytes=part_bytes, durable=False)
        if k == 0:
            print("ready", flush=True)
        storage.prune(root, keep_last=keep)
        k += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
