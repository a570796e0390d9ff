"""The digest of a model's live weights, reported by ``GET /v1/weights`` after every update: equal digests, equal
weights, so a trainer (or a test) can check what a server holds without reading it back.

On the host the digest is ``storage.digest``'s (xxh3_128 of every tensor's name, dtype code, shape and bytes,
combined in name order), the one manifests record, so a server's digest can be compared with a version's. On a GPU
that would copy the whole model to the host after every sync, so there each tensor is reduced on the device to one
64-bit number, ``sum64`` (``storage.digest``: an integer sum, so the same in any order on any device), and the
digest is ``sum64-`` followed by xxh3_128 over the names, dtype codes, shapes and those numbers; manifests record it
too. Only the numbers cross to the host. Either kind can be computed for any state (``scheme=``), from numpy arrays
too: a trainer compares like with like.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import paddle

import storage
from storage import code_of as _code
from storage import host_array
from storage.digest import ADD, MUL, sum64, sum64_digest, sum64_words, sums_digest
from storage.digest import state_digest as snapshot_digest

CHUNK = 1 << 24  # words reduced at a time on the device: the int64 temporaries stay at 128 MiB each
_MASK = 2**64 - 1
_SIGNED = {2: (paddle.int16, 0xFFFF), 4: (paddle.int32, 0xFFFFFFFF)}


def _signed64(n: int) -> int:
    return n - 2**64 if n >= 2**63 else n


def device_sum64(t: paddle.Tensor) -> paddle.Tensor:
    """``sum64`` of a 2- or 4-byte tensor computed where it lives, as an int64 scalar there (its bits are the
    unsigned value). Paddle's int64 arithmetic wraps like the reference's."""
    width, mask = _SIGNED[t.element_size()]
    flat = t.detach().reshape([-1]).view(width)
    def const(n: int) -> paddle.Tensor:  # a Python int operand would pass through float64 and lose bits
        return paddle.full([], _signed64(n), "int64").to(t.place)

    mul, add, total = const(MUL), const(ADD), const(0)
    for start in range(0, flat.shape[0], CHUNK):
        stop = min(start + CHUNK, flat.shape[0])
        words = paddle.bitwise_and(flat[start:stop].astype("int64"), const(mask))
        weights = paddle.arange(start, stop, dtype="int64").to(t.place) * mul + add
        total = total + (words * weights).sum()
    return total


def device_sums(state: Mapping[str, Any], names: list[str]) -> dict[str, int]:
    """``sum64`` of each named tensor, reduced where it lives; the numbers cross to the host in one transfer per
    device (stacked there first), not one per tensor, each of which would wait for the device to drain."""
    by_place: dict[str, list[str]] = {}
    for name in names:
        by_place.setdefault(str(state[name].place), []).append(name)
    sums = {}
    for group in by_place.values():
        values = paddle.stack([device_sum64(state[n]) for n in group]).numpy()
        sums.update({n: int(v) & _MASK for n, v in zip(group, values)})
    return sums


def _words(t: Any) -> np.ndarray:
    """A tensor's bytes as the unsigned words ``sum64`` reads, on the host."""
    arr = t if isinstance(t, np.ndarray) else host_array(t)
    return sum64_words(arr, arr.dtype.itemsize)


def _on_device(t: Any) -> bool:
    return not isinstance(t, np.ndarray) and not t.place.is_cpu_place()


def tensor_sums(state: Mapping[str, Any],
                index: Mapping[str, tuple[str, tuple[int, ...]]] | None = None) -> dict[str, int] | None:
    """Each tensor's ``sum64``, reduced where it lives (one transfer of the numbers per device); with ``index`` (a
    snapshot's name -> (dtype code, shape)), None unless ``state`` holds its tensors as they are (a cast target
    holds other bits). What a server keeps so that a delta's apply can advance them from the changed elements."""
    if index is not None and (set(state) != set(index) or any(
            _code(state[n]) != code or tuple(int(d) for d in state[n].shape) != tuple(shape)
            for n, (code, shape) in index.items())):
        return None
    names = sorted(state)
    sums = device_sums(state, [n for n in names if _on_device(state[n]) and state[n].element_size() in _SIGNED])
    return {n: sums[n] if n in sums else sum64(_words(state[n])) for n in names}


def state_digest(state: Mapping[str, Any], scheme: str | None = None) -> str:
    """The digest of ``state`` (numpy arrays or Paddle tensors): ``scheme="xxh3"`` over the bytes, ``"sum64"``
    over each tensor's device-reduced number; by default ``sum64`` when a tensor is on a GPU, else ``xxh3``.
    Numpy and Paddle tensors of the same values digest the same under either scheme."""
    scheme = scheme or ("sum64" if any(_on_device(t) for t in state.values()) else "xxh3")
    if scheme not in ("xxh3", "sum64"):
        raise ValueError(f"scheme {scheme!r}: use 'xxh3' or 'sum64'")
    if scheme == "xxh3":
        return snapshot_digest(state)
    sums = tensor_sums(state)
    return sum64_digest({n: (_code(t), t.shape, sums[n]) for n, t in state.items()})


def matching_sum64(targets: Mapping[str, Any], index: Mapping[str, tuple[str, tuple[int, ...]]]) -> str | None:
    """The targets' ``sum64`` digest, computed where they live, when they hold a snapshot's tensors as they are (its
    names, dtype codes and shapes, as ``index`` lists them); None when they do not (a cast target holds other bits):
    then only the host can read them as the snapshot's dtypes."""
    sums = tensor_sums(targets, index)
    return None if sums is None else sums_digest(index, sums)


def published_digest(held: str, snapshot_root: str, version: str, rank: int, *, fallback_dir: str | None = None,
                     storage_options: dict | None = None) -> str | None:
    """The xxh3 digest (the one deltas name their base by) of the state a GPU copy holds, proven by the ``sum64``
    digest it computed on the device after loading ``version``: the version's manifest records both. None where it
    cannot be proven (no manifest, one written before ``sum64``, another state): the loader then reads the chain."""
    try:
        manifest = storage.resolve(snapshot_root, version, rank, fallback_dir=fallback_dir,
                                   storage_options=storage_options).manifest
    except (storage.SnapshotError, OSError, ValueError):
        return None
    if manifest is None or manifest.sum64 != held:
        return None
    return manifest.digest
