"""Loading: find the best complete source, check it against the target, then apply it part by part.

Order of events, so a bad snapshot never touches live weights: (1) probe levels 1-4 and take the first
complete one; (2) check every name, shape and dtype against the target; (3) with ``verify="full"``, hash every
part against the manifest; only then (4) stream each part into the live tensors. Local parts are read with
``readinto`` straight into the parameters' memory, so nothing but the page cache sits between file and
weights; remote parts are fetched ``prefetch`` at a time and dropped once applied.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import xxhash
from tqdm.auto import tqdm

from . import layout
from .errors import IncompatibleTargetError, PartialApplyError, SnapshotNotFoundError, TornSnapshotError
from .fs import is_local, join, listing, open_fs
from .layout import Level
from .manifest import Manifest
from .pickle_safe import load_state_pickle
from .tensorfile import DTYPES, HEADER_PROBE_BYTES, Header, code_of_numpy, code_of_paddle, header_length, parse_header

log = logging.getLogger("baton.storage")
_HASH_WINDOW = 2 << 20
_FLOATS = {"F16", "BF16", "F32", "F64"}
Target = Union[Mapping[str, Any], Any]  # a dict of paddle tensors / numpy arrays, or a paddle.nn.Layer
CopyFn = Callable[[Any, Any], None]  # (live paddle tensor, loaded paddle tensor) -> None, in place


@dataclass
class Source:
    """One level's files, fully validated for structure (sizes, headers, manifest agreement)."""

    level: Level
    fs: Any
    files: list[str]
    sizes: list[int]
    headers: list[Header | None]
    digests: list[str | None]  # xxh3_128 from the manifest; None where there is no manifest
    arrays: dict[str, np.ndarray] | None = None  # level 4: the restricted-unpickled state dict
    manifest: Manifest | None = None

    @property
    def bytes(self) -> int:
        return sum(self.sizes)

    def urls(self) -> list[str]:
        return [self.fs.unstrip_protocol(f) for f in self.files]

    def index(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype code, shape) of every tensor in the source."""
        if self.arrays is not None:
            # paddle.save stores bfloat16 as uint16 arrays; Paddle reads them back as bfloat16, so do we
            return {n: ("BF16" if a.dtype == np.uint16 else code_of_numpy(a.dtype), tuple(a.shape)) for n, a in self.arrays.items()}
        return {e.name: (e.dtype, e.shape) for h in self.headers if h for e in h.entries}


@dataclass
class LoadReport:
    version: str
    rank: int
    level: int
    source: str  # the level's label, e.g. "chunked parts"
    files: list[str]
    bytes: int
    seconds: float
    tensors: int
    verified: str  # "xxh3_128 before apply", "xxh3_128 while applying" or what could not be checked
    state_dict: dict[str, Any] | None = field(default=None, repr=False)  # filled when into=None

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds else 0.0


def _url(fs, path: str) -> str:
    return fs.unstrip_protocol(path)


def _read_headers(fs, paths: list[str], sizes: list[int]) -> list[Header]:
    if not paths:
        return []
    urls = [_url(fs, p) for p in paths]
    blobs = fs.cat_ranges(paths, [0] * len(paths), [min(s, HEADER_PROBE_BYTES) for s in sizes])
    headers = []
    for path, url, size, blob in zip(paths, urls, sizes, blobs):
        need = 8 + header_length(blob, url, size)
        if need > len(blob):
            blob = fs.cat_file(path, start=0, end=need)
        headers.append(parse_header(blob, url, size))
    return headers


def _probe_parts(fs, root: str, names: Mapping[str, int], rank: int, version_id: str, strict: bool) -> Source | None:
    found = {int(m.group(1)): n for n in names if (m := layout.part_regex(rank, version_id).fullmatch(n))}
    manifest_file = layout.manifest_name(rank, version_id)
    if manifest_file in names:
        return _parts_with_manifest(fs, root, names, found, join(root, manifest_file), rank, version_id)
    if not found:
        return None
    if layout.pending_name(rank, version_id) in names:
        raise TornSnapshotError(
            _url(fs, join(root, layout.pending_name(rank, version_id))),
            "a Baton publish of this version is in progress or was interrupted (parts present, no manifest yet)")
    if strict:
        raise TornSnapshotError(
            _url(fs, join(root, manifest_file)),
            f"manifest missing for {len(found)} part file(s) (strict mode); publish with Baton, or pass "
            "strict=False to accept FastDeploy-style parts without a manifest")
    order = sorted(found)
    if order != list(range(len(order))):
        gap = next(i for i in range(len(order) + 1) if i not in found)
        raise TornSnapshotError(
            _url(fs, join(root, layout.part_name(rank, version_id, gap))),
            f"part {gap} is missing but parts {order} exist (gap in the numbering)")
    paths = [join(root, found[i]) for i in order]
    headers = _read_headers(fs, paths, [names[found[i]] for i in order])
    seen: dict[str, str] = {}
    for path, h in zip(paths, headers):
        for e in h.entries:
            if e.name in seen:
                raise TornSnapshotError(_url(fs, path), f"tensor {e.name!r} also appears in {seen[e.name]}")
            seen[e.name] = _url(fs, path)
    return Source(Level.PARTS, fs, paths, [names[found[i]] for i in order], headers, [None] * len(paths))


def _parts_with_manifest(fs, root, names, found, manifest_path, rank, version_id) -> Source:
    m = Manifest.from_json(fs.cat_file(manifest_path), _url(fs, manifest_path))
    if m.id != version_id or m.rank != rank:
        raise TornSnapshotError(_url(fs, manifest_path), f"manifest is for id {m.id!r} rank {m.rank}")
    paths = []
    for p in m.parts:
        path = join(root, p.file)
        if p.file != layout.part_name(rank, version_id, p.index) or p.file not in names:
            raise TornSnapshotError(_url(fs, path), f"part {p.index} listed in the manifest is missing")
        if names[p.file] != p.bytes:
            raise TornSnapshotError(
                _url(fs, path), f"size {names[p.file]} bytes, manifest says {p.bytes} (truncated or replaced)")
        paths.append(path)
    extra = sorted(set(found) - {p.index for p in m.parts})
    if extra:
        raise TornSnapshotError(
            _url(fs, join(root, found[extra[0]])), "part file not listed in the manifest (left from another publish?)")
    headers = _read_headers(fs, paths, [p.bytes for p in m.parts])
    count = 0
    for index, (path, h) in enumerate(zip(paths, headers)):
        for e in h.entries:
            rec = m.tensors.get(e.name)
            if rec is None or (rec.dtype, rec.shape, rec.part) != (e.dtype, e.shape, index):
                raise TornSnapshotError(_url(fs, path), f"tensor {e.name!r} disagrees with the manifest")
            count += 1
    if count != len(m.tensors):
        raise TornSnapshotError(_url(fs, manifest_path), f"manifest lists {len(m.tensors)} tensors, parts hold {count}")
    return Source(Level.PARTS, fs, paths, [p.bytes for p in m.parts], headers, [p.xxh3_128 for p in m.parts], manifest=m)


def _probe_file(fs, root: str, names: Mapping[str, int], name: str, level: Level) -> Source | None:
    if name not in names:
        return None
    path = join(root, name)
    return Source(level, fs, [path], [names[name]], _read_headers(fs, [path], [names[name]]), [None])


def _probe_fallback(url: str, rank: int, version_id: str, storage_options) -> Source | None:
    fs, root = open_fs(url, storage_options)
    name = layout.full_name(rank, version_id)
    names = listing(fs, root)
    if name not in names:
        return None
    path = join(root, name)
    head = fs.cat_file(path, start=0, end=1)
    if head != b"\x80":  # not a pickle: FastDeploy would fail here, but a safetensors file is safe to read
        return _probe_file(fs, root, names, name, Level.FALLBACK)
    arrays = load_state_pickle(fs.cat_file(path), _url(fs, path))
    return Source(Level.FALLBACK, fs, [path], [names[name]], [None], [None], arrays=arrays)


def probe_levels(
    root_url: str, version_id: str, rank: int = 0, *, fallback_dir: str | None = None, strict: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[tuple[Level, str, Source | None | TornSnapshotError]]:
    """Each level in priority order with what is there: a complete Source, None (absent) or why it is torn."""
    layout.check_id(version_id)
    layout.check_rank(rank)
    fs, root = open_fs(root_url, storage_options)
    names = listing(fs, root)
    base = join(root, layout.base_name(rank, version_id))
    probes = [
        (Level.PARTS, _url(fs, base + ".part*.pdparams"), lambda: _probe_parts(fs, root, names, rank, version_id, strict)),
        (Level.FULL, _url(fs, join(root, layout.full_name(rank, version_id))),
         lambda: _probe_file(fs, root, names, layout.full_name(rank, version_id), Level.FULL)),
        (Level.LEGACY, _url(fs, join(root, layout.legacy_name(version_id))),
         lambda: _probe_file(fs, root, names, layout.legacy_name(version_id), Level.LEGACY)),
    ]
    if fallback_dir:
        where = f"{fallback_dir.rstrip('/')}/{layout.full_name(rank, version_id)}"
        probes.append((Level.FALLBACK, where, lambda: _probe_fallback(fallback_dir, rank, version_id, storage_options)))
    for level, where, probe in probes:
        try:
            yield level, where, probe()
        except TornSnapshotError as exc:
            yield level, where, exc


def resolve(
    root_url: str, version_id: str, rank: int = 0, *, fallback_dir: str | None = None, strict: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Source:
    """The highest-priority complete source, or an error that lists every place checked and its state."""
    checked: list[str] = []
    torn: list[TornSnapshotError] = []
    for level, where, found in probe_levels(root_url, version_id, rank, fallback_dir=fallback_dir, strict=strict,
                                            storage_options=storage_options):
        if isinstance(found, Source):
            if torn:
                log.warning("loading %s from level %d (%s): a higher level is torn: %s", version_id, level,
                            level.label, "; ".join(map(str, torn)))
            return found
        if found is None:
            checked.append(f"level {level} ({level.label}): {where}: not found")
        else:
            torn.append(found)
            checked.append(f"level {level} ({level.label}): {found}")
    if not fallback_dir:
        checked.append(f"level 4 ({Level.FALLBACK.label}): not configured (fallback_dir=None)")
    if torn:
        raise TornSnapshotError(torn[0].path, torn[0].reason + "; nothing else loads. Checked:\n  - " + "\n  - ".join(checked))
    raise SnapshotNotFoundError(layout.base_name(rank, version_id), checked)


# ---- targets -------------------------------------------------------------------------------------------

def _target_table(into: Target) -> dict[str, Any]:
    if isinstance(into, Mapping):
        return dict(into)
    if hasattr(into, "state_dict"):
        return dict(into.state_dict())
    raise TypeError(f"into must be a paddle.nn.Layer or a dict of tensors, not {type(into).__name__}")


def _code_of(t: Any) -> str:
    return code_of_numpy(t.dtype) if isinstance(t, np.ndarray) else code_of_paddle(t.dtype)


def check_fits(index: Mapping[str, tuple[str, tuple[int, ...]]], targets: Mapping[str, Any], where: str, cast: bool) -> None:
    """Every difference between snapshot and target, reported at once; raises before anything is written."""
    problems = [f"missing tensor {n!r}" for n in sorted(set(targets) - set(index))]
    problems += [f"unexpected tensor {n!r} (not in the target)" for n in sorted(set(index) - set(targets))]
    for name in sorted(set(index) & set(targets)):
        code, shape = index[name]
        t = targets[name]
        if tuple(int(d) for d in t.shape) != shape:
            problems.append(f"{name!r}: shape {list(shape)} in the snapshot, {list(t.shape)} in the target")
        tcode = _code_of(t)
        if tcode != code and not (cast and code in _FLOATS and tcode in _FLOATS):
            problems.append(f"{name!r}: dtype {code} in the snapshot, {tcode} in the target (pass cast=True to convert floats)")
    if problems:
        more = f"; … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise IncompatibleTargetError(f"{where} does not fit the target: " + "; ".join(problems[:20]) + more)


def _host_view(dst: Any, code: str) -> np.ndarray | None:
    """A writable flat byte view of ``dst``'s own memory when the bytes can land there as they are."""
    if isinstance(dst, np.ndarray):
        ok = dst.flags.c_contiguous and dst.flags.writeable and code_of_numpy(dst.dtype) == code
        return dst.reshape(-1).view(np.uint8) if ok else None
    if code_of_paddle(dst.dtype) != code or not dst.place.is_cpu_place() or not dst.is_contiguous():
        return None
    import paddle

    t = dst.detach()
    if code == "BF16":
        t = t.view(paddle.uint16)
    elif code.startswith("F8"):
        t = t.view(paddle.uint8)
    if t.numel() == 0:
        return np.empty(0, np.uint8)
    try:
        return np.from_dlpack(t).reshape(-1).view(np.uint8)
    except (BufferError, RuntimeError, TypeError):
        return None


def _copy_converted(dst: Any, raw: np.ndarray, code: str, shape: tuple[int, ...], copy_fn: CopyFn | None) -> None:
    """The slow path: a dtype cast or a device copy, one tensor-sized temporary at most."""
    arr = raw.view(DTYPES[code][0]).reshape(shape)
    if isinstance(dst, np.ndarray):
        if code == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        np.copyto(dst, arr, casting="unsafe")
        return
    import paddle

    src = paddle.to_tensor(arr, place=dst.place)
    if code == "BF16":
        src = src.view(paddle.bfloat16)
    elif code.startswith("F8"):
        src = src.view(getattr(paddle, DTYPES[code][1]))
    if copy_fn is not None:
        copy_fn(dst, src)
        return
    with paddle.no_grad():
        paddle.assign(src if src.dtype == dst.dtype else src.astype(dst.dtype), output=dst)


def _apply_bytes(dst: Any, data: np.ndarray, code: str, shape, copy_fn: CopyFn | None) -> None:
    view = _host_view(dst, code) if copy_fn is None else None
    if view is not None:
        np.copyto(view, data)
    else:
        _copy_converted(dst, data, code, shape, copy_fn)


def _readinto(f, buf: np.ndarray, url: str) -> None:
    mv, got = memoryview(buf), 0
    while got < buf.nbytes:
        n = f.readinto(mv[got:])
        if not n:
            raise OSError(f"{url}: file ended after {got} of {buf.nbytes} bytes while reading (changed under the reader?)")
        got += n


def _hash_local(path: str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for off in range(0, size, _HASH_WINDOW):  # windows keep mapped pages (counted in RSS) to a few MiB
            with mmap.mmap(f.fileno(), min(_HASH_WINDOW, size - off), offset=off, access=mmap.ACCESS_READ) as m:
                h.update(m)
    return h.hexdigest()


def _hash_remote(fs, path: str) -> str:
    return xxhash.xxh3_128(fs.cat_file(path)).hexdigest()


def _verify_all(src: Source, prefetch: int) -> None:
    todo = [(p, d) for p, d in zip(src.files, src.digests) if d]
    hasher = _hash_local if is_local(src.fs) else functools.partial(_hash_remote, src.fs)
    with ThreadPoolExecutor(max(1, prefetch)) as pool:
        for (path, expected), got in zip(todo, pool.map(hasher, [p for p, _ in todo])):
            if got != expected:
                raise TornSnapshotError(_url(src.fs, path), f"xxh3_128 {got} does not match the manifest's {expected} (corrupt or replaced)")


def _fetch_parts(src: Source, prefetch: int) -> Iterator[tuple[int, bytes | None]]:
    """Parts in order; remote bodies fetched ``prefetch`` ahead so I/O overlaps applying."""
    if is_local(src.fs):
        yield from ((i, None) for i in range(len(src.files)))
        return
    with ThreadPoolExecutor(max(1, prefetch)) as pool:
        futures = [pool.submit(src.fs.cat_file, p) for p in src.files[:prefetch]]
        for i in range(len(src.files)):
            blob = futures.pop(0).result()
            if i + prefetch < len(src.files):
                futures.append(pool.submit(src.fs.cat_file, src.files[i + prefetch]))
            yield i, blob
            del blob


def _apply_blob(blob: bytes, header: Header, targets, copy_fn: CopyFn | None, applied: list[str]) -> None:
    for e in header.entries:
        _apply_bytes(targets[e.name], np.frombuffer(blob, np.uint8, e.nbytes, e.start), e.dtype, e.shape, copy_fn)
        applied.append(e.name)


def _apply_file(path: str, url: str, header: Header, targets, copy_fn: CopyFn | None, h, applied: list[str], bar) -> None:
    with open(path, "rb", buffering=0) as f:  # unbuffered: readinto lands in the parameter itself
        head = f.read(header.data_start)
        if len(head) != header.data_start:
            raise OSError(f"{url}: header shrank while reading (changed under the reader?)")
        if h is not None:
            h.update(head)
        for e in header.entries:
            dst = targets[e.name]
            view = _host_view(dst, e.dtype) if copy_fn is None else None
            buf = view if view is not None else np.empty(e.nbytes, np.uint8)
            f.seek(e.start)
            _readinto(f, buf, url)
            if h is not None:
                h.update(buf)
            if view is None:
                _copy_converted(dst, buf, e.dtype, e.shape, copy_fn)
            applied.append(e.name)
            bar.update(e.nbytes)


def _apply(src: Source, targets: Mapping[str, Any], verify: str, copy_fn: CopyFn | None, prefetch: int, bar) -> None:
    applied: list[str] = []

    def fail(url: str, reason: str) -> Exception:
        return PartialApplyError(f"{url}: {reason}", applied) if applied else TornSnapshotError(url, reason)

    if src.arrays is not None:
        index = src.index()
        for name, arr in src.arrays.items():
            raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            _apply_bytes(targets[name], raw, index[name][0], index[name][1], copy_fn)
            applied.append(name)
            bar.update(raw.nbytes)
        return
    url = _url(src.fs, src.files[0])
    try:
        for i, blob in _fetch_parts(src, prefetch):
            url, expected = _url(src.fs, src.files[i]), (src.digests[i] if verify != "none" else None)
            h = xxhash.xxh3_128() if expected else None
            if blob is None:
                _apply_file(src.files[i], url, src.headers[i], targets, copy_fn, h, applied, bar)
            else:
                if len(blob) != src.sizes[i]:
                    raise fail(url, f"read {len(blob)} bytes, expected {src.sizes[i]} (changed under the reader?)")
                if h is not None:
                    h.update(blob)
                if h is None or h.hexdigest() == expected:  # a fetched part is checked before any of it is applied
                    _apply_blob(blob, src.headers[i], targets, copy_fn, applied)
                    bar.update(len(blob))
            if h is not None and h.hexdigest() != expected:
                raise fail(url, "checksum does not match the manifest (changed after it was verified?)")
    except OSError as exc:
        raise fail(url, f"storage error while applying: {exc}") from exc


def load_snapshot(
    root_url: str,
    version_id: str,
    rank: int = 0,
    *,
    fallback_dir: str | None = None,
    into: Target | None = None,
    verify: str | bool = "full",
    strict: bool = False,
    cast: bool = False,
    copy_fn: CopyFn | None = None,
    prefetch: int = 2,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> LoadReport:
    """Load version ``version_id`` of ``rank`` into ``into`` in place, trying levels 1-4 in order.

    ``verify``: ``"full"`` (default) hashes every part before the first write, so corruption leaves the target
    untouched; ``"stream"`` hashes each part while applying it (one read; a corrupt part found midway raises
    ``PartialApplyError`` and the caller restores); ``"none"`` checks sizes and headers only. ``strict`` refuses
    parts without a manifest. ``cast`` lets float snapshots load into float targets of another dtype.
    ``copy_fn(live, loaded)`` replaces the in-place copy (e.g. a GPU cast kernel). With ``into=None`` fresh
    Paddle tensors are allocated and returned in ``report.state_dict``.
    """
    if verify is True or verify is False:
        verify = "full" if verify else "none"
    if verify not in ("full", "stream", "none"):
        raise ValueError(f"verify must be 'full', 'stream' or 'none', not {verify!r}")
    start = time.perf_counter()
    src = resolve(root_url, version_id, rank, fallback_dir=fallback_dir, strict=strict, storage_options=storage_options)
    targets, verified = apply_source(src, into, verify=verify, cast=cast, copy_fn=copy_fn, prefetch=prefetch,
                                     progress=progress, label=f"load {version_id} tp{rank}")
    return LoadReport(
        version_id, rank, int(src.level), src.level.label, src.urls(), src.bytes, time.perf_counter() - start,
        len(targets), verified, targets if into is None else None)


def check_source(src: Source, into: Target, *, verify: str = "full", cast: bool = False, prefetch: int = 2) -> None:
    """Everything that can be known before a byte of ``into`` changes: names, shapes and dtypes fit, and with
    ``verify="full"`` every part's checksum. A server checks every rank's source this way before applying any."""
    where = src.urls()[0] + (f" (+{len(src.files) - 1} more parts)" if len(src.files) > 1 else "")
    check_fits(src.index(), _target_table(into), where, cast)
    if verify == "full" and any(src.digests):
        _verify_all(src, prefetch)


def apply_source(
    src: Source, into: Target | None, *, verify: str = "full", cast: bool = False, copy_fn: CopyFn | None = None,
    prefetch: int = 2, progress: bool = False, label: str = "load",
) -> tuple[dict[str, Any], str]:
    """Check ``src`` against the target, verify, apply; returns the target table and what was verified."""
    index = src.index()
    if into is None:
        import paddle

        targets = {n: paddle.empty(list(shape), dtype=DTYPES[code][1]) for n, (code, shape) in index.items()}
    else:
        targets = _target_table(into)
    check_source(src, targets, verify=verify, cast=cast, prefetch=prefetch)
    has_digests = any(src.digests)
    with tqdm(total=src.bytes, unit="B", unit_scale=True, desc=label, disable=not progress) as bar:
        _apply(src, targets, verify, copy_fn, prefetch, bar)
    if not has_digests or verify == "none":
        verified = "sizes and headers only" + ("" if has_digests else " (no manifest: no checksums to check)")
    else:
        verified = "xxh3_128 before apply" if verify == "full" else "xxh3_128 while applying"
    return targets, verified


def read_state_file(url: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A whole trainer file (safetensors, or a paddle.save pickle read without running code) as Paddle tensors."""
    fs, path = open_fs(url, storage_options)
    root, _, name = path.rpartition("/")
    names = listing(fs, root)
    if name not in names:
        raise FileNotFoundError(f"{url}: no such file")
    if fs.cat_file(path, start=0, end=1) == b"\x80":
        with fs.open(path, "rb", block_size=16 << 20) as f:
            arrays = load_state_pickle(f, url)
        index = Source(Level.FULL, fs, [path], [names[name]], [None], [None], arrays=arrays).index()
        return {n: _adopt(a, index[n][0]) for n, a in arrays.items()}
    src = _probe_file(fs, root, names, name, Level.FULL)
    return apply_source(src, None, verify="none", label=f"read {name}")[0]


def checkpoint_files(source: str, *, storage_options: dict[str, Any] | None = None) -> list[tuple[int | None, str]]:
    """``(rank, url)`` of each file of a trainer checkpoint: the file itself (rank None), a directory's
    ``model_state.tp{r}.pdparams`` files in rank order, or a directory's single state file (rank None)."""
    fs, path = open_fs(source, storage_options)
    if fs.isfile(path):
        return [(None, source)]
    names = listing(fs, path)
    ranks = sorted((int(m.group(1)), n) for n in names if (m := layout.TRAINER_RANK_FILE.fullmatch(n)))
    if ranks:
        return [(r, fs.unstrip_protocol(join(path, n))) for r, n in ranks]
    singles = sorted(n for n in names if n.endswith((".pdparams", ".safetensors")))
    if len(singles) == 1:
        return [(None, fs.unstrip_protocol(join(path, singles[0])))]
    if not names and not fs.exists(path):
        raise FileNotFoundError(f"{source}: no such checkpoint file or directory")
    raise ValueError(f"{source}: expected one state dict file or model_state.tp{{r}}.pdparams files, found "
                     f"{sorted(names)[:10] or 'nothing'}")


def _adopt(arr: np.ndarray, code: str) -> Any:
    """A Paddle tensor over the unpickled array's own memory (no copy); bfloat16 arrives as uint16 bits."""
    import paddle

    arr = np.ascontiguousarray(arr)
    if code == "BF16":  # Paddle views int16 (not uint16) as bfloat16
        arr = arr.view(np.int16)
    t = paddle.utils.dlpack.from_dlpack(arr) if arr.size else paddle.to_tensor(arr)
    return t.view(paddle.bfloat16) if code == "BF16" else t
