"""The process's two worker threads, for loops that release the GIL (numba's ``nogil`` loops, zstd): a delta's
windows, a state's sums, a publish's comparisons. Kept for the process because starting threads per tensor cost
more than a small delta's apply; two because this is what the machines Baton is measured on have (``bench/``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

_NAME = "baton-cores"
_pool: list[ThreadPoolExecutor] = []


def _executor() -> ThreadPoolExecutor:
    if not _pool:
        _pool.append(ThreadPoolExecutor(2, thread_name_prefix=_NAME))
    return _pool[0]


def _inside() -> bool:
    """Whether this is one of the two threads: work it asks for runs inline, never queued behind itself."""
    return threading.current_thread().name.startswith(_NAME)


def each(fn: Callable[[Any], Any], jobs: Sequence[Any]) -> list:
    """``[fn(job) for job in jobs]``, two at a time when there are several. Returns once every job has ended, so a
    failure never leaves a write running behind the caller; then raises the first job's error, in ``jobs`` order."""
    if len(jobs) < 2 or _inside():
        return [fn(job) for job in jobs]
    futures = [_executor().submit(fn, job) for job in jobs]
    wait(futures)
    return [f.result() for f in futures]


def submit(fn: Callable[..., Any], *args: Any) -> Future:
    """``fn(*args)`` on one of the two threads (inline, already done, when called from one of them)."""
    if not _inside():
        return _executor().submit(fn, *args)
    done: Future = Future()
    try:
        done.set_result(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future, as the pool would
        done.set_exception(exc)
    return done
