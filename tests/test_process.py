"""Whole-process behaviour: peak memory while loading, and a publisher killed mid-write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import storage

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import sys, paddle, storage
    root, version, count, each = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    # imports, reader threads and their malloc arenas: one-time costs, out of the way before measuring
    storage.load_snapshot(root, "warm", into={"a": paddle.zeros([16]), "b": paddle.zeros([16])})
    target = {f"t{i}": paddle.zeros([each // 4]) for i in range(count)}  # the live weights, allocated and touched
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = status("VmRSS")
    storage.load_snapshot(root, version, into=target)
    assert float(target["t3"][7]) == 3.0
    print(status("VmHWM") - before)
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_stays_within_a_part(tmp_path):
    part, count, each = 16 * MiB, 16, 16 * MiB  # a 256 MiB model in 16 parts
    root = str(tmp_path / "snap")
    storage.publish({f"t{i}": np.full(each // 4, float(i), np.float32) for i in range(count)}, root, "big",
                    part_bytes=part)
    storage.publish({"a": np.ones(16, np.float32), "b": np.ones(16, np.float32)}, root, "warm", part_bytes=64)
    out = subprocess.run([sys.executable, "-c", _CHILD, root, "big", str(count), str(each)], capture_output=True,
                         text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    delta = int(out.stdout.split()[-1])
    print(f"peak RSS delta {delta / MiB:.1f} MiB")
    assert delta <= 1.25 * part, f"peak RSS rose {delta / MiB:.1f} MiB loading a 256 MiB model in 16 MiB parts"


_PUBLISHER = textwrap.dedent("""
    import sys, numpy as np, storage
    state = {f"t{i}": np.full(8 << 20, float(i), np.float32) for i in range(8)}  # 8 parts of 32 MiB
    storage.publish(state, sys.argv[1], "k", part_bytes=32 << 20, durable=True)
""")


def test_publisher_killed_midway_leaves_nothing_that_loads(tmp_path):
    root = tmp_path / "snap"
    proc = subprocess.Popen([sys.executable, "-c", _PUBLISHER, str(root)], cwd=REPO)
    deadline = time.monotonic() + 120
    while not (root / "model_state.tp0.k.part1.pdparams").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "publisher ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (root / "model_state.tp0.k.manifest.json").exists()
    target = {f"t{i}": np.zeros(8 << 20, np.float32) for i in range(8)}
    with pytest.raises(storage.TornSnapshotError, match="in progress or was interrupted"):
        storage.load_snapshot(str(root), "k", into=target)
    assert not target["t0"].any()
    # a new publish of the same id cleans the leftovers and commits
    storage.publish({"t0": np.ones(4, np.float32)}, str(root), "k")
    assert sorted(p.name for p in root.iterdir()) == ["model_state.tp0.k.manifest.json",
                                                      "model_state.tp0.k.part0.pdparams"]
