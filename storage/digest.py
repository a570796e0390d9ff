"""The digest of a state: equal digests, equal tensors (names, dtypes, shapes and every byte).

Each tensor is hashed on its own (xxh3_128 of ``name|dtype|shape;`` then its bytes) and the state's digest is
xxh3_128 over those, in name order: a publisher computes it part by part in state-dict order as it writes, and
a server over its live weights, and the two agree. A manifest records its rank's digest; a delta records its
base's too, which is how a loader knows, never assumes, that a target holds the base.

A manifest also records the rank's ``sum64`` digest: each tensor reduced to one 64-bit number (its bytes read as
unsigned words ``w_i``, 8-bit for 1-byte dtypes, 16-bit for 2-byte ones, 32-bit otherwise, then
``sum(w_i * (i * MUL + ADD)) mod 2**64``), and ``sum64-`` followed by xxh3_128 over each tensor's
``name|dtype|shape;`` and its number, in name order. An integer sum is the same in any order on any device, so a GPU
computes it where the weights live and only the numbers cross to the host (``infer/digest.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numba
import numpy as np
import xxhash

from .cores import each
from .tensorfile import code_of, host_bytes

MUL, ADD = 0x9E3779B97F4A7C15, 0x632BE59BD9B4E019  # odd constants: every position weighs differently


def tensor_digest(name: str, code: str, shape, raw: np.ndarray | bytes | memoryview) -> bytes:
    """One tensor's 16-byte digest; ``raw`` its bytes (little-endian, C order)."""
    h = xxhash.xxh3_128(f"{name}|{code}|{[int(d) for d in shape]};".encode())
    h.update(memoryview(raw).cast("B") if isinstance(raw, np.ndarray) else raw)
    return h.digest()


def sum64_words(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """A tensor's bytes (flat, C order) as the unsigned words ``sum64`` reads."""
    flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if itemsize == 1:
        return flat
    return flat.view(np.uint16 if itemsize == 2 else np.uint32)


@numba.njit(cache=True, nogil=True)
def _weighted_sum(words, mul, add):  # pragma: no cover - compiled
    """Four independent sums over words i, i+1, i+2, i+3, so the multiplies overlap instead of waiting on one sum;
    uint64 throughout, so every step wraps mod 2**64."""
    n = words.size
    t0 = t1 = t2 = t3 = np.uint64(0)
    w0, w1, w2, w3 = add, add + mul, add + mul * np.uint64(2), add + mul * np.uint64(3)
    step = mul * np.uint64(4)
    i = 0
    while i + 4 <= n:
        t0 += np.uint64(words[i]) * w0
        t1 += np.uint64(words[i + 1]) * w1
        t2 += np.uint64(words[i + 2]) * w2
        t3 += np.uint64(words[i + 3]) * w3
        w0 += step
        w1 += step
        w2 += step
        w3 += step
        i += 4
    while i < n:
        t0 += np.uint64(words[i]) * w0
        w0 += mul
        i += 1
    return t0 + t1 + t2 + t3


def sum64(words: np.ndarray) -> int:
    """``sum(w_i * (i * MUL + ADD)) mod 2**64`` of unsigned words, in one pass with no temporaries."""
    return int(_weighted_sum(words, np.uint64(MUL), np.uint64(ADD)))


def sum64_digest(tensors: Mapping[str, tuple[str, Sequence[int], int]]) -> str:
    """The state's ``sum64`` digest from each tensor's ``(dtype code, shape, sum64)``."""
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        code, shape, value = tensors[name]
        h.update(f"{name}|{code}|{[int(d) for d in shape]};".encode())
        h.update(int(value).to_bytes(8, "little"))
    return "sum64-" + h.hexdigest()


def tensor_sums(targets: Mapping[str, Any], index: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, int]:
    """Each tensor's ``sum64`` read as ``index``'s dtype (name -> (dtype code, shape)), on the host: what a delta's
    apply advances from the changed elements alone (``deltacodec.apply(..., weigh=True)``)."""
    from .tensorfile import itemsize

    def one(item: tuple[str, tuple[str, tuple[int, ...]]]) -> int:
        name, (code, _) = item
        return sum64(sum64_words(host_bytes(targets[name], code), itemsize(code)))

    return dict(zip(index, each(one, list(index.items()))))  # on both cores: a pass over the whole state


def sums_digest(index: Mapping[str, tuple[str, Sequence[int]]], sums: Mapping[str, int]) -> str:
    """The state's ``sum64`` digest from ``index`` (name -> (dtype code, shape)) and each tensor's ``sum64``."""
    return sum64_digest({n: (code, shape, sums[n]) for n, (code, shape) in index.items()})


def combine(tensors: Mapping[str, bytes]) -> str:
    """The state's digest from its tensors' (``tensor_digest``)."""
    h = xxhash.xxh3_128()
    for name in sorted(tensors):
        h.update(tensors[name])
    return h.hexdigest()


def state_digest(targets: Mapping[str, Any],
                 index: Mapping[str, tuple[str, tuple[int, ...]]] | None = None) -> str | None:
    """The digest of ``targets`` (numpy arrays or Paddle tensors) read as ``index``'s dtypes (name -> (dtype code,
    shape); by default each tensor's own), so a target cast to another float dtype digests as the snapshot it holds.
    None when ``targets`` do not have ``index``'s names and shapes, so cannot hold any version of that snapshot."""
    if index is None:
        index = {n: (code_of(t), tuple(int(d) for d in t.shape)) for n, t in targets.items()}
    elif set(targets) != set(index) or any(tuple(int(d) for d in targets[n].shape) != tuple(s)
                                           for n, (_, s) in index.items()):
        return None
    return combine({n: tensor_digest(n, code, shape, host_bytes(targets[n], code))
                    for n, (code, shape) in index.items()})
