"""The process's two worker threads, for loops that release the GIL (numba's ``nogil`` loops, zstd): a delta's
windows, a state's sums. Kept for the process because starting threads per tensor cost more than a small delta's
apply; two because this is what the machines Baton is measured on have (``bench/``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

_pool: list[ThreadPoolExecutor] = []


def each(fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list:
    """``[fn(job) for job in jobs]``, two at a time when there are several. Returns once every job has ended, so a
    failure never leaves a write running behind the caller; then raises the first job's error, in ``jobs`` order.
    ``fn`` must not call ``each`` itself (both threads could wait on jobs queued behind them)."""
    if len(jobs) < 2:
        return [fn(job) for job in jobs]
    if not _pool:
        _pool.append(ThreadPoolExecutor(2, thread_name_prefix="baton-cores"))
    futures = [_pool[0].submit(fn, job) for job in jobs]
    wait(futures)
    return [f.result() for f in futures]
