"""Publishing a delta version: only the elements whose bits changed since a committed base (``deltacodec``).

The base's values come from the trainer's own memory when it kept what it last published (``LastPublished``:
one comparison pass, no read of storage) or else from the snapshot root, read through the base's own chain.
A delta is written only when it pays: a state whose names, dtypes or shapes differ from the base's, a base
``max_chain - 1`` deltas from its full version (``MAX_DELTA_DEPTH`` by default), or changes that encode to more
than ``max_ratio`` of the full bytes are published as a full version instead, and the report says why. So is a base
that cannot be read (pruned, a manifest or a file of its chain missing or corrupt, a base republished under the
delta's feet): the trainer's step must not fail because an older version is damaged, and a full version ends the
damaged chain.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import cores, deltacodec
from .deltaload import RankReader, resolve_chain
from .digest import combine, sum64, sum64_digest, sum64_words, tensor_digest
from .errors import SnapshotError
from .manifest import Base, PartRecord, TensorRecord
from .tensorfile import encode_header, itemsize

MAX_DELTA_DEPTH = 8  # a full version at least every 8: a server that missed versions reads at most 7 deltas past it
MAX_RATIO = 0.5  # above half the full bytes, a delta saves too little to be worth a chain link


@dataclass
class _Held:
    version: str
    digest: str
    depth: int
    index: dict[str, tuple[str, tuple[int, ...]]]
    values: dict[str, np.ndarray] = field(repr=False)  # name -> flat uint8 copy of the published bytes


class LastPublished:
    """What this process published last, per rank, in host memory: pass the same object to every
    ``publish(..., cache=...)`` and a delta costs one comparison pass over the new state instead of a read of
    the base from storage. It holds one copy of each rank's state; a publish that fails forgets the rank."""

    def __init__(self) -> None:
        self._ranks: dict[int, _Held] = {}

    def version(self, rank: int = 0) -> str | None:
        held = self._ranks.get(rank)
        return held.version if held else None

    def begin(self, rank: int, base: str | None) -> Recording:
        """A publish of ``rank`` on ``base`` begins: the rank is forgotten until the recording commits. The recording
        holds the last publish's values when they are ``base``'s."""
        held = self._ranks.pop(rank, None)
        return Recording(self, rank, held if held is not None and held.version == base else None,
                         held.values if held else {})


class Recording:
    """One publish's copy of the state it writes, into the buffers of the last (reused when sizes allow); ``commit``
    makes it what the ``LastPublished`` holds for the rank."""

    def __init__(self, cache: LastPublished, rank: int, base: _Held | None, buffers: dict[str, np.ndarray]):
        self.cache, self.rank, self.base, self.buffers = cache, rank, base, buffers
        self.values: dict[str, np.ndarray] = {}

    def keep(self, item, raw: np.ndarray) -> None:
        old = self.buffers.get(item.name)
        if old is None or old.nbytes != raw.nbytes:
            old = np.empty(raw.nbytes, np.uint8)
        np.copyto(old, raw)
        self.values[item.name] = old

    def compared_in_place(self) -> None:
        """The delta was encoded against the base's own buffers, which took the new values as they went."""
        self.values = self.base.values

    def commit(self, version: str, digest: str, depth: int, items: list) -> None:
        index = {i.name: (i.code, i.shape) for i in items}
        self.cache._ranks[self.rank] = _Held(version, digest, depth, index, self.values)


class BaseValues:
    """The base's bytes tensor by tensor, from the cache (updated in place as the delta is encoded) or storage."""

    def __init__(self, version: str, digest: str | None, depth: int, index: dict, raw: Callable[[str], np.ndarray],
                 in_place: bool):
        self.version, self.digest, self.depth, self.index = version, digest, depth, index
        self.raw, self.in_place = raw, in_place

    @classmethod
    def from_cache(cls, held: _Held) -> BaseValues:
        return cls(held.version, held.digest, held.depth, held.index, held.values.__getitem__, True)

    @classmethod
    def from_root(cls, snapshot_root: str, version: str, rank: int, storage_options) -> BaseValues:
        """The base read through its chain under ``snapshot_root``; any failure to read it, now or tensor by tensor
        later, raises ``BaseUnreadable``."""
        try:
            chain = resolve_chain(snapshot_root, version, rank, strict=True, storage_options=storage_options)
        except UNREADABLE as exc:
            raise BaseUnreadable(version, exc) from exc
        reader, last = RankReader(chain), chain[-1].manifest

        def raw(name: str) -> np.ndarray:
            try:
                return reader.raw(name)
            except UNREADABLE as exc:
                raise BaseUnreadable(version, exc) from exc

        return cls(version, last.digest, last.depth, reader.index, raw, False)


# What reading a base can raise when the base, not the caller, is at fault: a version or file that is missing
# (SnapshotNotFoundError, FileNotFoundError), corrupt (TornSnapshotError, a checksum or digest mismatch, a delta
# that does not decode), or storage that would not give it (OSError).
UNREADABLE = (SnapshotError, OSError, ValueError)


class BaseUnreadable(Exception):
    """The base could not be read: the version is published in full instead, and the note says why."""

    def __init__(self, version: str, cause: BaseException):
        reason = " ".join(str(cause).split()) or type(cause).__name__
        super().__init__(f"base {version} cannot be read ({reason[:600]}): publishing in full")


def why_full(items: list, base: BaseValues, max_chain: int) -> str | None:
    """Why a delta on ``base`` cannot be written, or None."""
    if base.digest is None:
        return f"base {base.version} has no digest in its manifest (published before deltas): publishing in full"
    if base.depth + 1 >= max_chain:
        return (f"base {base.version} is {base.depth} deltas from a full version (max_chain={max_chain}): "
                "publishing in full")
    mine = {i.name: (i.code, i.shape) for i in items}
    if mine != base.index:
        diff = sorted(set(mine) ^ set(base.index)) or sorted(n for n in mine if mine[n] != base.index[n])
        return f"the state differs from base {base.version} in names, dtypes or shapes ({diff[:3]}): publishing in full"
    return None


class TooLarge(Exception):
    """The delta grew past its limit: the version is published in full instead."""


def write_delta(items: list, raw_of: Callable, base: BaseValues, part_bytes: int, limit: int,
                write: Callable[[int, list, int], PartRecord],
                keep: Callable[[Any, np.ndarray], None]) -> tuple[list[PartRecord], dict[str, TensorRecord], str, str]:
    """Encodes each tensor against the base and writes the blobs as ``delta{N}`` files of about ``part_bytes``
    (``write(index, buffers, count)`` writes file N and returns its record). Returns the files' and tensors'
    records and the new state's digest and ``sum64`` digest; raises ``TooLarge`` once the files pass ``limit``
    bytes."""
    records: list[PartRecord] = []
    tensors: dict[str, TensorRecord] = {}
    digests: dict[str, bytes] = {}
    sums: dict[str, tuple[str, tuple[int, ...], int]] = {}
    pending: list[tuple[str, bytes]] = []
    written = 0

    def flush() -> None:
        nonlocal pending
        index = len(records)
        header = encode_header([(n, "U8", (len(b),), len(b)) for n, b in pending], {"format": "baton.delta"})
        records.append(write(index, [header, *(b for _, b in pending)], len(pending)))
        pending = []

    def compared(item, new: np.ndarray, old: np.ndarray) -> tuple[int, bytes | None]:  # on a worker thread
        width = itemsize(item.code)
        return sum64(sum64_words(new, width)), deltacodec.encode(old, new, width, update=base.in_place)

    def finish() -> None:
        nonlocal written
        item, new, job = running.popleft()
        total, blob = job.result()
        sums[item.name] = (item.code, item.shape, total)
        keep(item, new)
        if blob is None:
            tensors[item.name] = TensorRecord(item.code, item.shape, None)
            return
        written += len(blob)
        if written > limit:
            raise TooLarge(f"the delta passed {limit} bytes")
        if pending and sum(len(b) for _, b in pending) + len(blob) > part_bytes:
            flush()
        tensors[item.name] = TensorRecord(item.code, item.shape, len(records))
        pending.append((item.name, blob))

    # each tensor is compared with the base (and summed) on a worker thread while this one hashes it with xxh3 and
    # fetches the next: two tensors in flight, so the machine's two cores both work
    running: deque = deque()
    try:
        for item in items:
            new = raw_of(item)
            running.append((item, new, cores.submit(compared, item, new, base.raw(item.name))))
            digests[item.name] = tensor_digest(item.name, item.code, item.shape, new)
            while len(running) > 2:
                finish()
        while running:
            finish()
    finally:
        wait([job for *_, job in running])  # nothing writes into the cache's buffers once this returns
    if pending or not records:  # a version with nothing changed still has its (empty) file 0
        flush()
    return records, tensors, combine(digests), sum64_digest(sums)


def base_record(base: BaseValues) -> Base:
    return Base(base.version, base.digest)
