"""The publisher zygote (``python -m harness.chaos.zygote``): reads ``root first scale part_bytes`` lines on stdin
and forks one publisher per line, which prints ``started PID`` and publishes until it is killed.

Forking from one process makes each killed publisher a real process without a Python start-up per kill. The
zygote forks before it opens any storage connection or starts any thread, so each child starts clean.
"""

from __future__ import annotations

import os
import signal
import sys

import storage
from harness.chaos.loads import version_id, version_state


def publish_forever(root: str, first: int, scale: int, part_bytes: int) -> None:
    """What a killed publisher runs: versions ``first``, ``first + 1``, … back to back until it is killed. It
    says "started" once its storage connection is warm (one publish elsewhere), so kill moments are drawn over
    publishing, not set-up."""
    storage.publish(version_state(0, scale), root + "-warm", "warm", part_bytes=part_bytes, overwrite=True)
    os.write(1, f"started {os.getpid()}\n".encode())
    for k in range(first, first + 1000):
        storage.publish(version_state(k, scale), root, version_id(k), part_bytes=part_bytes, durable=True)


def main() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps killed children
    for line in sys.stdin:
        root, first, scale, part = line.split()
        if os.fork() == 0:
            publish_forever(root, int(first), int(scale), int(part))
            os._exit(0)


if __name__ == "__main__":
    main()
