"""What a load must yield and how one is judged: the numbered versions every process can derive, Paddle targets
pre-filled with a sentinel, and the classification of a load into the outcome kinds of ``tally.KINDS``."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

import storage

STORAGE_ERRORS = (storage.SnapshotError, OSError)


def host_bytes(t) -> np.ndarray:
    """A writable flat byte view of a CPU Paddle tensor (or numpy array): to read and to reset targets exactly."""
    return storage.host_array(t).reshape(-1).view(np.uint8)


def bytes_of(state: dict) -> dict[str, bytes]:
    return {name: host_bytes(t).tobytes() for name, t in state.items()}


def fill(target: dict, raw: dict[str, bytes]) -> None:
    for name, data in raw.items():
        host_bytes(target[name])[:] = np.frombuffer(data, np.uint8)


def paddle_target(state: dict, sentinel: int = 0xA5) -> tuple[dict, dict[str, bytes]]:
    """Paddle tensors shaped like ``state`` holding a sentinel byte pattern (no published version looks like it),
    and that pattern, to tell "untouched" from "written" exactly."""
    import paddle

    target = {}
    for name, t in state.items():
        dtype = str(t.dtype).removeprefix("paddle.")
        target[name] = paddle.zeros(list(t.shape), dtype=dtype)
    pattern = {name: bytes([sentinel]) * host_bytes(t).nbytes for name, t in target.items()}
    fill(target, pattern)
    return target, pattern


def judge_load(load: Callable[[], object], target: dict, versions: dict[str, dict[str, bytes]]) -> tuple[str, str]:
    """Runs one load into ``target`` and classifies it: success must leave exactly one published version; an error
    must leave the target as it was, except a ``PartialApplyError`` whose ``applied`` covers every change."""
    before = bytes_of(target)
    try:
        load()
    except storage.PartialApplyError as exc:
        changed = {n for n, b in bytes_of(target).items() if b != before[n]}
        missing = changed - set(exc.applied)
        if missing:
            return "bad", f"PartialApplyError does not name changed tensors {sorted(missing)}: {exc}"
        return "partial", "PartialApplyError"
    except STORAGE_ERRORS as exc:
        if bytes_of(target) != before:
            return "bad", f"target changed under {type(exc).__name__}: {str(exc)[:300]}"
        return "refused_clean", type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - anything else is itself a finding
        return "bad", f"unexpected {type(exc).__module__}.{type(exc).__name__}: {str(exc)[:300]}"
    after = bytes_of(target)
    for version, expected in versions.items():
        if after == expected:
            return "succeeded", version
    return "bad", "load returned success but the target holds no published version (torn load)"


def version_id(k: int) -> str:
    return f"p{k:05d}"


@lru_cache(maxsize=256)
def version_state(k: int, scale: int) -> dict[str, np.ndarray]:
    """Version ``k``'s tensors (about 6.4 KB per ``scale``), the same in every process: publishers and checkers
    derive the expected bytes from ``k`` alone. Several dtypes, and two same-shaped layers."""
    rng = np.random.default_rng(k)
    n = 16 * scale
    return {
        "embed.weight": rng.standard_normal((n, 64), np.float32),
        "layers.0.w": rng.standard_normal((n, 32)).astype(np.float16),
        "layers.1.w": rng.standard_normal((n, 32)).astype(np.float16),
        "ids": rng.integers(0, 1 << 40, n, dtype=np.int64),
        "mask": rng.integers(0, 255, n * 8, dtype=np.uint8),
        "odd": rng.standard_normal((3, 5, 7), np.float32),
    }


def expected(k: int, scale: int) -> dict[str, bytes]:
    return {name: a.tobytes() for name, a in version_state(k, scale).items()}
