"""Publishing: shard a state dict into safetensors parts, then commit it by writing the manifest last."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash
from tqdm.auto import tqdm

from . import layout
from .delta import (MAX_CHAIN, MAX_RATIO, BaseUnreadable, BaseValues, LastPublished, TooLarge, base_record, why_full,
                    write_delta)
from .digest import combine, sum64, sum64_digest, sum64_words, tensor_digest
from .errors import SnapshotExistsError
from .fs import is_local, join, listing, open_fs, storage_calls
from .manifest import Manifest, PartRecord, TensorRecord
from .tensorfile import code_of_numpy, code_of_paddle, encode_header, itemsize, paddle_eager

DEFAULT_PART_BYTES = 512 << 20
PAGE = 4096
# Tensor bytes that start on a page boundary in the file are copied into (page-aligned) live tensors ~25% faster
# here than bytes at an offset such as 8 + header length; parts this large get a page-aligned layout.
ALIGN_FROM_BYTES = 1 << 20


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
class TensorRef:
    """A tensor that is read only when the part holding it is written (``storage.hf_tensors`` gives these), so
    publishing a checkpoint larger than memory holds about one part of it at a time."""

    code: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]  # its values (bfloat16 as 16-bit integers), C-contiguous


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
        raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}; expected a Paddle tensor or numpy array")
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
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value).reshape(-1).view(np.uint8)
    paddle = paddle_eager()

    t = value.detach()
    if not t.place.is_cpu_place():
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if item.code == "BF16":
        t = t.view(paddle.uint16)
    elif item.code.startswith("F8"):
        t = t.view(paddle.uint8)
    if item.nbytes == 0:
        return np.empty(0, np.uint8)
    return np.from_dlpack(t).reshape(-1).view(np.uint8)


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


def digests(buffers: Iterable, sha256: bool = True) -> tuple[str | None, str]:
    """(sha256 or None, xxh3_128) of the concatenated buffers: the checksums a manifest records per part."""
    sha, xx = hashlib.sha256() if sha256 else None, xxhash.xxh3_128()
    for b in buffers:
        if sha is not None:
            sha.update(b)
        xx.update(b)
    return sha.hexdigest() if sha is not None else None, xx.hexdigest()


def _write_local(path: str, buffers: list, hasher: ThreadPoolExecutor, durable: bool,
                 sha256: bool) -> tuple[str | None, str]:
    # hashing (GIL released) on one core overlaps the kernel copying pages on the other
    digest: Future = hasher.submit(digests, buffers, sha256)
    with open(path, "wb") as f:
        for b in buffers:
            f.write(b)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    return digest.result()


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


def _remove_version(fs, root: str, names: Mapping[str, int], rank: int, version: str) -> None:
    """Manifest first: from that instant the version no longer exists for any reader."""
    manifest = layout.manifest_name(rank, version)
    if manifest in names:
        fs.rm_file(join(root, manifest))
    parts, deltas = layout.part_regex(rank, version), layout.delta_regex(rank, version)
    for name in names:
        if parts.fullmatch(name) or deltas.fullmatch(name) or name == layout.pending_name(rank, version):
            fs.rm_file(join(root, name))


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
    max_chain: int = MAX_CHAIN,
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
    if base is not None and layout.check_id(base) == version:
        raise ValueError(f"base {base!r} is the version being published: a delta needs an earlier version")
    if part_bytes <= 0:
        raise ValueError(f"part_bytes must be positive, got {part_bytes}")
    if not state_dict:
        raise ValueError("state_dict is empty: nothing to publish")
    items = [_describe(str(k), v) for k, v in state_dict.items()]
    fs, root = open_fs(snapshot_root, storage_options)
    local = is_local(fs)
    names = listing(fs, root)
    manifest_file = layout.manifest_name(rank, version)
    if manifest_file in names and not overwrite:
        raise SnapshotExistsError(
            f"{snapshot_root}/{manifest_file} already exists: version {version!r} rank {rank} is published. "
            "Pick a new id, or pass overwrite=True (--overwrite) to replace it")
    _remove_version(fs, root, names, rank, version)  # leftovers of an interrupted publish, or the overwrite
    if local:
        os.makedirs(root, exist_ok=True)
    marker = join(root, layout.pending_name(rank, version))
    fs.pipe_file(marker, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}).encode())

    start = time.perf_counter()
    recording = cache._record(rank, base) if cache is not None else None
    keep = recording.keep if recording is not None else (lambda item, raw: None)
    manifest, note = None, ""
    if base is not None:
        manifest, note = _try_delta(fs, root, items, rank, version, base, recording, part_bytes, max_chain,
                                    max_ratio, durable, sha256, keep, snapshot_root, storage_options)
    if manifest is None:
        plan = plan_parts(items, part_bytes)
        records, tensors, digest, sums = _write_parts(fs, root, plan, rank, version, durable, sha256, progress, keep)
        manifest = Manifest(version, rank, time.time(), records, tensors, {}, digest, sum64=sums)
    manifest.metadata = dict(metadata or {})
    manifest_path = join(root, manifest_file)
    if local:
        _write_atomic_local(manifest_path, manifest.to_json(), durable)
    else:
        fs.pipe_file(manifest_path, manifest.to_json())
    fs.rm_file(marker)
    if recording is not None:
        recording.commit(version, manifest.digest, manifest.depth, items)
    seconds = time.perf_counter() - start
    return PublishReport(version, rank, len(manifest.parts), manifest.total_bytes, seconds,
                         f"{snapshot_root.rstrip('/')}/{manifest_file}", "delta" if manifest.is_delta else "full",
                         manifest.base.version if manifest.is_delta else None, sum(i.nbytes for i in items), note)


def _try_delta(fs, root: str, items: list[_Item], rank: int, version: str, base: str, recording, part_bytes: int,
               max_chain: int, max_ratio: float, durable: bool, sha256: bool, keep, snapshot_root: str,
               storage_options) -> tuple[Manifest | None, str]:
    """The delta's manifest once its files are written, or (None, why) when the version goes out in full: the
    base does not fit, cannot be read (``BaseUnreadable``), or the delta would not pay. Failures to write the
    delta's own files raise."""
    try:
        if recording is not None and recording.base is not None:
            values = BaseValues.from_cache(recording.base)
        else:
            values = BaseValues.from_root(snapshot_root, base, rank, storage_options)
    except BaseUnreadable as exc:
        return None, str(exc)
    why = why_full(items, values, max_chain)
    if why:
        return None, why
    limit = int(max_ratio * sum(i.nbytes for i in items))
    with ThreadPoolExecutor(1) as hasher:
        put = functools.partial(_put, fs, root, hasher, durable, sha256)
        try:
            # the cache's own buffers take the new values as they are compared: nothing to keep separately
            records, tensors, digest, sums = write_delta(items, _raw_bytes, values, rank, version, part_bytes, limit,
                                                         put, (lambda item, raw: None) if values.in_place else keep)
        except (TooLarge, BaseUnreadable) as exc:
            deltas = layout.delta_regex(rank, version)
            for name in listing(fs, root):
                if deltas.fullmatch(name):
                    fs.rm_file(join(root, name))
            if isinstance(exc, BaseUnreadable):
                return None, str(exc)
            return None, f"the delta passed {max_ratio:.0%} of the full bytes: publishing in full"
    if values.in_place:
        recording.compared_in_place()
    manifest = Manifest(version, rank, time.time(), records, tensors, {}, digest, base_record(values), values.depth + 1,
                        sums)
    return manifest, ""


def _put(fs, root: str, hasher: ThreadPoolExecutor, durable: bool, sha256: bool, name: str, index: int,
         buffers: list, count: int) -> PartRecord:
    """Writes one file whole and returns its record."""
    if is_local(fs):
        size = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in buffers)
        sha, xx = _write_local(join(root, name), buffers, hasher, durable, sha256)
        return PartRecord(name, index, size, sha, xx, count)
    data = b"".join(buffers)
    sha, xx = digests([data], sha256)
    fs.pipe_file(join(root, name), data)
    return PartRecord(name, index, len(data), sha, xx, count)


def _tensor_digests(items: list[_Item], raws: list[np.ndarray], into: dict[str, bytes],
                    sums: dict[str, tuple[str, tuple[int, ...], int]]) -> None:
    for i, raw in zip(items, raws):
        into[i.name] = tensor_digest(i.name, i.code, i.shape, raw)
        sums[i.name] = (i.code, i.shape, sum64(sum64_words(raw, itemsize(i.code))))


def _write_parts(fs, root: str, plan: list[list[_Item]], rank: int, version: str, durable: bool, sha256: bool,
                 progress: bool, keep) -> tuple[list[PartRecord], dict[str, TensorRecord], str, str]:
    """Every part of ``plan``, hashed as written: locally one writer and one hashing thread, remotely up to two
    uploads in flight (memory: two parts). Returns the parts' and the tensors' records for the manifest, and the
    state's digest and ``sum64`` digest (each tensor hashed beside the write); ``keep(item, raw)`` sees every
    tensor's bytes."""
    local = is_local(fs)
    records: list[PartRecord | None] = [None] * len(plan)
    tensors: dict[str, TensorRecord] = {}
    state: dict[str, bytes] = {}
    sums: dict[str, tuple[str, tuple[int, ...], int]] = {}
    bar = tqdm(total=sum(i.nbytes for part in plan for i in part), unit="B", unit_scale=True,
               desc=f"publish {version} tp{rank}", disable=not progress)
    with ThreadPoolExecutor(2) as pool:
        pending: list[Future] = []
        for index, part in enumerate(plan):
            name = layout.part_name(rank, version, index)
            align = PAGE if sum(i.nbytes for i in part) >= ALIGN_FROM_BYTES else 8
            if align == PAGE:  # whole-page tensors first, so every one of them starts on a page too
                part = sorted(part, key=lambda i: i.nbytes % PAGE != 0)
            header = encode_header([(i.name, i.code, i.shape, i.nbytes) for i in part], {"format": "pd"}, align)
            for i in part:
                tensors[i.name] = TensorRecord(i.code, i.shape, index)
            buffers = [header, *(_raw_bytes(i) for i in part)]
            hashed = pool.submit(_tensor_digests, part, buffers[1:], state, sums)
            for i, raw in zip(part, buffers[1:]):
                keep(i, raw)
            if local:
                size = sum(len(b) if isinstance(b, bytes) else b.nbytes for b in buffers)
                sha, xx = _write_local(join(root, name), buffers, pool, durable, sha256)
                records[index] = PartRecord(name, index, size, sha, xx, len(part))
                bar.update(size - len(header))
            else:
                while len(pending) >= 2:
                    pending.pop(0).result()
                pending.append(pool.submit(_upload, fs, join(root, name), buffers, index, len(part), records, bar,
                                           sha256))
            hashed.result()
        for f in pending:
            f.result()
    bar.close()
    return [r for r in records if r], tensors, combine(state), sum64_digest(sums)


def _upload(fs, path: str, buffers: list, index: int, count: int, records: list, bar, sha256: bool) -> None:
    data = b"".join(buffers)  # one part in memory: object stores take whole bodies
    sha, xx = digests([data], sha256)
    fs.pipe_file(path, data)
    records[index] = PartRecord(path.rsplit("/", 1)[-1], index, len(data), sha, xx, count)
    bar.update(len(data) - len(buffers[0]))


@dataclass(frozen=True)
class VersionInfo:
    version: str
    ranks: tuple[int, ...]
    published_at: float
    bytes: int
    base: str | None = None  # a delta's base version: it must stay while this one is kept


@storage_calls
def list_versions(snapshot_root: str, *, storage_options: dict[str, Any] | None = None) -> list[VersionInfo]:
    """Committed versions (those with a manifest), oldest first."""
    fs, root = open_fs(snapshot_root, storage_options)
    found: dict[str, list[Manifest]] = {}
    for name in listing(fs, root):
        parsed = layout.parse_manifest_name(name)
        if parsed:
            try:
                raw = fs.cat_file(join(root, name))
            except FileNotFoundError:  # pruned since it was listed
                continue
            found.setdefault(parsed[1], []).append(Manifest.from_json(raw, join(root, name)))
    infos = [
        VersionInfo(vid, tuple(sorted(m.rank for m in ms)), max(m.published_at for m in ms), sum(m.total_bytes for m in ms),
                    next((m.base.version for m in ms if m.is_delta), None))
        for vid, ms in found.items()
    ]
    return sorted(infos, key=lambda v: (v.published_at, v.version))


@storage_calls
def prune(
    snapshot_root: str,
    keep_last: int,
    *,
    keep: tuple[str, ...] | list[str] = (),
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Delete all but the newest ``keep_last`` versions (and any id in ``keep``); returns the ids removed.

    A version a kept delta is built on (its base, the base's base, down to a full version) is kept too. Each
    version's manifests go first, so a reader either sees the whole version or none of it.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (got {keep_last}): pruning never deletes every version")
    versions = list_versions(snapshot_root, storage_options=storage_options)
    bases = {v.version: v.base for v in versions}
    kept = {v.version for v in versions[max(0, len(versions) - keep_last):]} | set(keep)
    for version in list(kept):
        while bases.get(version) and bases[version] not in kept:
            version = bases[version]
            kept.add(version)
    doomed = [v for v in versions if v.version not in kept]
    fs, root = open_fs(snapshot_root, storage_options)
    names = listing(fs, root)
    for v in doomed:
        for rank in v.ranks:
            _remove_version(fs, root, names, rank, v.version)
    return [v.version for v in doomed]
