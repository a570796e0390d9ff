"""One ``sync-weights`` run in its own process (``python -m harness.chaos.sync VERSION ROOT SERVERS_JSON
SOURCE``), so that the Prefect server can be killed under it; prints ``SYNC-COMPLETED`` if the flow returns."""

from __future__ import annotations

import json
import sys

from flows.sync import sync_weights


def main(version: str, root: str, servers: list[str], source: str) -> None:
    sync_weights(version=version, snapshot_root=root, servers=servers, source=source, part_bytes=16 << 20)
    print("SYNC-COMPLETED", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
