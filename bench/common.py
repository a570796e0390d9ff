"""What every benchmark script shares: where results go, the machine they ran on, and peak-memory probes."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from harness.launch import free_port, log, wait_until  # noqa: E402,F401  (the benchmarks' helpers too)

RESULTS_DIR = REPO / "bench" / "results"


def proc_status_bytes(key: str, pid: int | str = "self") -> int:
    """A byte count from /proc/PID/status, e.g. ``VmRSS`` or ``VmHWM`` (the peak RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> int:
    """Resets VmHWM to the current RSS (Linux ``clear_refs``) and returns that RSS: peak minus this is the
    memory a step added on top of what was already resident."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_bytes("VmRSS")


def proc_meminfo_gib(key: str) -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return round(int(line.split()[1]) / (1 << 20), 2)
    return 0.0


def machine_info() -> dict:
    import paddle

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {
        "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu": cpu,
        "mem_total_gib": proc_meminfo_gib("MemTotal"), "platform": platform.platform(),
        "python": platform.python_version(), "paddle": paddle.__version__, "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "git_commit": commit,
    }


def parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--quick`` (a smoke test) and ``--out``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, help="JSON results (default bench/results/NAME.json; with --quick a temp "
                                            "file, so a smoke run never replaces the committed figures)")
    return p


def results_path(args: argparse.Namespace, name: str) -> Path:
    return args.out or (Path(tempfile.gettempdir()) / f"{name}.quick.json" if args.quick
                        else RESULTS_DIR / f"{name}.json")


def write_results(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"\nwrote {path}")
