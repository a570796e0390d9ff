"""Publishing: shard a state dict into safetensors parts, then commit it by writing the manifest last."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import layout
from .catalog import remove_version
from .delta import (
    MAX_DELTA_DEPTH,
    MAX_RATIO,
    BaseUnreadable,
    BaseValues,
    LastPublished,
    TooLarge,
    base_record,
    why_full,
    write_delta,
)
from .digest import combine, sum64, sum64_digest, sum64_words, tensor_digest
from .errors import SnapshotExistsError
from .fs import checksums, is_local, join, listing, open_fs, storage_calls
from .manifest import Manifest, PartRecord, TensorRecord
from .tensorfile import TensorRef, code_of_numpy, code_of_paddle, encode_header, host_bytes, itemsize

DEFAULT_PART_BYTES = 512 << 20
ALIGN = 4096  # a page: tensor bytes that start on one are copied into (page-aligned) live tensors faster than
ALIGN_FROM_BYTES = 1 << 20  # bytes at an offset such as 8 + header length; parts this large get the aligned layout


@dataclass(frozen=True)
class PublishReport:
    version: str
    rank: int
    parts: int
    bytes: int  # written: the parts, or a delta's files
    seconds: float
    manifest_url: str
    kind: str = "full"  # or "delta"
    base: str | None = None  # a delta's base version
    full_bytes: int = 0  # the tensors' bytes: what a full version of the rank holds
    note: str = ""  # why a publish asked for as a delta was written in full

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class PublishOptions:
    """How ``publish`` writes a version (its keyword arguments, documented there), checked when made."""

    part_bytes: int = DEFAULT_PART_BYTES
    overwrite: bool = False
    metadata: Mapping[str, str] = field(default_factory=dict)
    durable: bool = True
    sha256: bool = False
    progress: bool = False
    storage_options: dict[str, Any] | None = None
    base: str | None = None
    cache: LastPublished | None = None
    max_chain: int = MAX_DELTA_DEPTH
    max_ratio: float = MAX_RATIO

    def __post_init__(self) -> None:
        if self.base is not None:
            layout.check_id(self.base)
        if self.part_bytes <= 0:
            raise ValueError(f"part_bytes must be positive, got {self.part_bytes}")


@dataclass(frozen=True)
class _Item:
    name: str
    value: Any
    code: str
    shape: tuple[int, ...]
    nbytes: int


def _describe(name: str, value: Any) -> _Item:
    if isinstance(value, TensorRef):
        code = value.code
    elif isinstance(value, np.ndarray):
        code = code_of_numpy(value.dtype)
    elif type(value).__module__.startswith("paddle") or hasattr(value, "place"):
        code = code_of_paddle(value.dtype)
    else:
        raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}; expected a Paddle tensor or numpy "
                        "array")
    shape = tuple(int(d) for d in value.shape)
    return _Item(name, value, code, shape, int(np.prod(shape, dtype=np.int64)) * itemsize(code))


def _raw_bytes(item: _Item) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array, sharing memory with a contiguous CPU tensor."""
    value = item.value
    if isinstance(value, TensorRef):
        raw = np.ascontiguousarray(value.read()).reshape(-1).view(np.uint8)
        if raw.nbytes != item.nbytes:
            raise ValueError(f"{item.name}: read {raw.nbytes} bytes, expected {item.nbytes} for {item.code} "
                             f"{list(item.shape)}")
        return raw
    return host_bytes(value)


def plan_parts(items: list[_Item], part_bytes: int) -> list[list[_Item]]:
    """Greedy, order-preserving split; a tensor larger than ``part_bytes`` gets a part of its own."""
    parts: list[list[_Item]] = []
    size = 0
    for item in items:
        if not parts or (size + item.nbytes > part_bytes and parts[-1]):
            parts.append([])
            size = 0
        parts[-1].append(item)
        size += item.nbytes
    return parts


def _write_local(path: str, buffers: list, hasher: ThreadPoolExecutor, durable: bool,
                 sha256: bool) -> tuple[str | None, str]:
    # hashing (the GIL released) on one core overlaps the kernel copying pages on another
    checksummed: Future = hasher.submit(checksums, buffers, sha256)
    with open(path, "wb") as f:
        for b in buffers:
            f.write(b)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return checksummed.result()


def _write_atomic_local(path: str, data: bytes, durable: bool) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@storage_calls
def publish(
    state_dict: Mapping[str, Any],
    snapshot_root: str,
    version: str,
    rank: int = 0,
    *,
    part_bytes: int = DEFAULT_PART_BYTES,
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
    durable: bool = True,
    sha256: bool = False,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    base: str | None = None,
    cache: LastPublished | None = None,
    max_chain: int = MAX_DELTA_DEPTH,
    max_ratio: float = MAX_RATIO,
) -> PublishReport:
    """Write ``state_dict`` as ``model_state.tp{rank}.{id}.part{N}.pdparams`` files plus the manifest.

    With ``base`` (a committed version), only what changed since it is written, as a delta (``storage.delta``),
    unless the base does not fit, is ``max_chain - 1`` deltas from a full version, or the delta would pass
    ``max_ratio`` of the full bytes: then the version is written in full and ``report.note`` says why.
    ``cache`` (a ``LastPublished`` passed to every call) keeps what was published in memory, so the base is
    compared there instead of read back from storage.

    Until the manifest lands the version does not exist for Baton readers, and a ``.publishing`` marker keeps
    FastDeploy-compatible (manifest-less) readers from taking the half-written parts either. ``durable``
    fsyncs local parts before the manifest so a power cut cannot commit a version whose bytes are lost.
    ``sha256`` also records each part's SHA-256 for audits (``baton verify --sha256``); loads check xxh3_128,
    and SHA-256 would cost about as much as the write itself.
    """
    layout.check_id(version)
    layout.check_rank(rank)
    if base is not None and base == version:
        raise ValueError(f"base {base!r} is the version being published: a delta needs an earlier version")
    options = PublishOptions(part_bytes, overwrite, dict(metadata or {}), durable, sha256, progress, storage_options,
                             base, cache, max_chain, max_ratio)
    if not state_dict:
        raise ValueError("state_dict is empty: nothing to publish")
    return _publish([_describe(str(k), v) for k, v in state_dict.items()], snapshot_root, version, rank, options)


def _publish(items: list[_Item], snapshot_root: str, version: str, rank: int, options: PublishOptions) -> PublishReport:
    fs, root = open_fs(snapshot_root, options.storage_options)
    local = is_local(fs)
    names = listing(fs, root)
    manifest_file = layout.manifest_name(rank, version)
    if manifest_file in names and not options.overwrite:
        raise SnapshotExistsError(
            f"{snapshot_root}/{manifest_file} already exists: version {version!r} rank {rank} is published. "
            "Pick a new id, or pass overwrite=True (--overwrite) to replace it")
    remove_version(fs, root, names, rank, version)  # leftovers of an interrupted publish, or the overwrite
    if local:
        os.makedirs(root, exist_ok=True)
    marker = join(root, layout.pending_name(rank, version))
    fs.pipe_file(marker, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                     "started": time.time()}).encode())

    start = time.perf_counter()
    recording = options.cache.begin(rank, options.base) if options.cache is not None else None
    keep = recording.keep if recording is not None else (lambda item, raw: None)
    manifest, note = None, ""
    if options.base is not None:
        manifest, note = _try_delta(_Sink(fs, root, rank, version, options), items, snapshot_root, recording, keep)
    if manifest is None:
        plan = plan_parts(items, options.part_bytes)
        records, tensors, digest, sums = _write_parts(_Sink(fs, root, rank, version, options), plan, keep)
        manifest = Manifest(version, rank, time.time(), records, tensors, {}, digest, sum64=sums)
    manifest.metadata = dict(options.metadata)
    manifest_path = join(root, manifest_file)
    if local:
        _write_atomic_local(manifest_path, manifest.to_json(), options.durable)
    else:
        fs.pipe_file(manifest_path, manifest.to_json())
    fs.rm_file(marker)
    if recording is not None:
        recording.commit(version, manifest.digest, manifest.depth, items)
    seconds = time.perf_counter() - start
    return PublishReport(version, rank, len(manifest.parts), manifest.total_bytes, seconds,
                         f"{snapshot_root.rstrip('/')}/{manifest_file}", "delta" if manifest.is_delta else "full",
                         manifest.base.version if manifest.is_delta else None, sum(i.nbytes for i in items), note)


class _Sink:
    """Where one publish's files go, full parts and delta files alike: each written whole and checksummed as it is
    written (locally the checksum runs on ``pool`` beside the write), and its record returned."""

    def __init__(self, fs, root: str, rank: int, version: str, options: PublishOptions):
        self.fs, self.root, self.rank, self.version, self.options = fs, root, rank, version, options
        self.pool: ThreadPoolExecutor | None = None

    def part(self, index: int, buffers: list, count: int) -> PartRecord:
        return self._write(layout.part_name(self.rank, self.version, index), index, buffers, count)

    def delta(self, index: int, buffers: list, count: int) -> PartRecord:
        return self._write(layout.delta_name(self.rank, self.version, index), index, buffers, count)

    def _write(self, name: str, index: int, buffers: list, count: int) -> PartRecord:
        """``buffers[0]`` is the file's header (``encode_header``), which the record keeps for readers."""
        path, sha256 = join(self.root, name), self.options.sha256
        head = buffers[0]
        header = {"header": head[8:].rstrip(b" ").decode(), "data_start": len(head)}
        if is_local(self.fs):
            size = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in buffers)
            sha, xx = _write_local(path, buffers, self.pool, self.options.durable, sha256)
            return PartRecord(name, index, size, sha, xx, count, **header)
        data = b"".join(buffers)  # one file in memory: object stores take whole bodies
        sha, xx = checksums([data], sha256)
        self.fs.pipe_file(path, data)
        return PartRecord(name, index, len(data), sha, xx, count, **header)


def _try_delta(sink: _Sink, items: list[_Item], snapshot_root: str, recording, keep) -> tuple[Manifest | None, str]:
    """The delta's manifest once its files are written, or (None, why) when the version goes out in full: the
    base does not fit, cannot be read (``BaseUnreadable``), or the delta would not pay. Failures to write the
    delta's own files raise."""
    options, rank, version = sink.options, sink.rank, sink.version
    try:
        if recording is not None and recording.base is not None:
            values = BaseValues.from_cache(recording.base)
        else:
            values = BaseValues.from_root(snapshot_root, options.base, rank, options.storage_options)
    except BaseUnreadable as exc:
        return None, str(exc)
    why = why_full(items, values, options.max_chain)
    if why:
        return None, why
    limit = int(options.max_ratio * sum(i.nbytes for i in items))
    with ThreadPoolExecutor(1) as sink.pool:
        try:
            # the cache's own buffers take the new values as they are compared: nothing to keep separately
            records, tensors, digest, sums = write_delta(
                items, _raw_bytes, values, options.part_bytes, limit, sink.delta,
                (lambda item, raw: None) if values.in_place else keep)
        except (TooLarge, BaseUnreadable) as exc:
            deltas = layout.delta_regex(rank, version)
            for name in listing(sink.fs, sink.root):
                if deltas.fullmatch(name):
                    sink.fs.rm_file(join(sink.root, name))
            if isinstance(exc, BaseUnreadable):
                return None, str(exc)
            return None, f"the delta passed {options.max_ratio:.0%} of the full bytes: publishing in full"
    if values.in_place:
        recording.compared_in_place()
    manifest = Manifest(version, rank, time.time(), records, tensors, {}, digest, base_record(values), values.depth + 1,
                        sums)
    return manifest, ""


def _tensor_digests(items: list[_Item], raws: list[np.ndarray], into: dict[str, bytes],
                    sums: dict[str, tuple[str, tuple[int, ...], int]]) -> None:
    for i, raw in zip(items, raws):
        into[i.name] = tensor_digest(i.name, i.code, i.shape, raw)
        sums[i.name] = (i.code, i.shape, sum64(sum64_words(raw, itemsize(i.code))))


def _write_parts(sink: _Sink, plan: list[list[_Item]],
                 keep) -> tuple[list[PartRecord], dict[str, TensorRecord], str, str]:
    """Every part of ``plan``, checksummed as written: locally one writer and one hashing thread, remotely up to two
    uploads in flight (memory: two parts). Returns the parts' and the tensors' records for the manifest, and the
    state's digest and ``sum64`` digest (each tensor hashed beside the write); ``keep(item, raw)`` sees every
    tensor's bytes."""
    local = is_local(sink.fs)
    records: list[PartRecord | None] = [None] * len(plan)
    tensors: dict[str, TensorRecord] = {}
    state: dict[str, bytes] = {}
    sums: dict[str, tuple[str, tuple[int, ...], int]] = {}
    bar = tqdm(total=sum(i.nbytes for part in plan for i in part), unit="B", unit_scale=True,
               desc=f"publish {sink.version} tp{sink.rank}", disable=not sink.options.progress)

    def upload(index: int, buffers: list, count: int) -> None:
        records[index] = sink.part(index, buffers, count)
        bar.update(records[index].bytes - len(buffers[0]))

    with ThreadPoolExecutor(2) as sink.pool:
        pending: list[Future] = []
        for index, part in enumerate(plan):
            align = ALIGN if sum(i.nbytes for i in part) >= ALIGN_FROM_BYTES else 8
            if align == ALIGN:  # whole-page tensors first, so every one of them starts on a page too
                part = sorted(part, key=lambda i: i.nbytes % ALIGN != 0)
            header = encode_header([(i.name, i.code, i.shape, i.nbytes) for i in part], {"format": "pd"}, align)
            for i in part:
                tensors[i.name] = TensorRecord(i.code, i.shape, index)
            buffers = [header, *(_raw_bytes(i) for i in part)]
            hashed = sink.pool.submit(_tensor_digests, part, buffers[1:], state, sums)
            for i, raw in zip(part, buffers[1:]):
                keep(i, raw)
            if local:
                upload(index, buffers, len(part))
            else:
                while len(pending) >= 2:
                    pending.pop(0).result()
                pending.append(sink.pool.submit(upload, index, buffers, len(part)))
            hashed.result()
        for f in pending:
            f.result()
    bar.close()
    return [r for r in records if r], tensors, combine(state), sum64_digest(sums)
