"""Applying a resolved source to live tensors, so that a bad snapshot never touches them unannounced.

Order: (1) check every name, shape and dtype against the target, and that every target can be written;
(2) with ``verify="full"`` only, hash every part against the manifest; then (3) stream each part into the live
tensors, hashing it as it goes (``"stream"``, the default: every byte read once). Parts are read with
``readinto`` straight into the parameters' memory, a cache-sized window at a time so the hash reads it from
cache. Remote parts are first downloaded once, ``prefetch`` at a time, into a local temporary directory, and
applied as they arrive; without room there, they are fetched into memory two at a time and each is hashed
before any of it is applied. Files are read, never memory-mapped (here or anywhere in ``storage``): a part
truncated while mapped would kill the process with SIGBUS. Once the first byte of a target has changed,
any failure is a ``PartialApplyError`` naming every tensor touched, so the caller knows to restore.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import xxhash
from tqdm.auto import tqdm

from .errors import IncompatibleTargetError, PartialApplyError, TornSnapshotError
from .fs import HASH_WINDOW, is_local, storage_calls, storage_error
from .resolve import Source, disappeared
from .tensorfile import DTYPE_CODES, Header, code_of, copy_converted, host_view, paddle_eager, url_of

log = logging.getLogger("baton.storage")
_FLOATS = {"F16", "BF16", "F32", "F64"}
Target = Mapping[str, Any] | Any  # a dict of paddle tensors / numpy arrays, or a paddle.nn.Layer
CopyFn = Callable[[Any, Any], None]  # (live paddle tensor, loaded paddle tensor) -> None, in place


def target_table(into: Target) -> dict[str, Any]:
    if isinstance(into, Mapping):
        return dict(into)
    if hasattr(into, "state_dict"):
        return dict(into.state_dict())
    raise TypeError(f"into must be a paddle.nn.Layer or a dict of tensors, not {type(into).__name__}")


def _unwritable(t: Any) -> str | None:
    """Why ``t`` cannot take bytes in place, or None."""
    if isinstance(t, np.ndarray):
        return None if t.flags.writeable else "is a read-only numpy array"
    if not hasattr(t, "place") or not hasattr(t, "dtype"):
        return f"is a {type(t).__name__}, not a tensor"
    return None


def check_targets(index: Mapping[str, tuple[str, tuple[int, ...]]], targets: Mapping[str, Any], where: str,
                  cast: bool) -> None:
    """Every difference between snapshot and target, reported at once; raises before anything is written."""
    problems = [f"missing tensor {n!r}" for n in sorted(set(targets) - set(index))]
    problems += [f"unexpected tensor {n!r} (not in the target)" for n in sorted(set(index) - set(targets))]
    for name in sorted(set(index) & set(targets)):
        code, shape = index[name]
        t = targets[name]
        why = _unwritable(t)
        if why:
            problems.append(f"{name!r}: the target {why}")
            continue
        if tuple(int(d) for d in t.shape) != shape:
            problems.append(f"{name!r}: shape {list(shape)} in the snapshot, {list(t.shape)} in the target")
        tcode = code_of(t)
        if tcode != code and not (cast and code in _FLOATS and tcode in _FLOATS):
            problems.append(f"{name!r}: dtype {code} in the snapshot, {tcode} in the target (pass cast=True to "
                            "convert floats)")
    if problems:
        more = f"; … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise IncompatibleTargetError(f"{where} does not fit the target: " + "; ".join(problems[:20]) + more)


def _apply_bytes(dst: Any, data: np.ndarray, code: str, shape, copy_fn: CopyFn | None) -> None:
    view = host_view(dst, code) if copy_fn is None else None
    if view is not None:
        np.copyto(view, data)
    else:
        copy_converted(dst, data, code, shape, copy_fn)


def _readinto(f, buf: memoryview | np.ndarray, url: str) -> None:
    mv, got = memoryview(buf).cast("B"), 0
    while got < mv.nbytes:
        n = f.readinto(mv[got:])
        if not n:
            raise TornSnapshotError(url, f"file ended after {got} of {mv.nbytes} bytes while reading "
                                    "(truncated or replaced while loading?)")
        got += n


def _guarded(fn, fs):
    """``fn(path)`` with a vanished file reported as a torn snapshot that names it."""
    def run(path: str):
        try:
            return fn(path)
        except FileNotFoundError:
            raise disappeared(url_of(fs, path)) from None
    return run


def _fetch_parts(src: Source, ready: Callable[[int], None] | None) -> Iterator[tuple[int, bytes | None]]:
    """Parts in order: local files (``ready(i)`` first), or remote bodies fetched into memory two ahead."""
    if ready is not None:
        for i in range(len(src.files)):
            ready(i)
            yield i, None
        return
    fetch = _guarded(src.fs.cat_file, src.fs)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(fetch, p) for p in src.files[:2]]
        for i in range(len(src.files)):
            blob = futures.pop(0).result()
            if i + 2 < len(src.files):
                futures.append(pool.submit(fetch, src.files[i + 2]))
            yield i, blob
            del blob


def _apply_blob(blob: bytes, header: Header, targets, copy_fn: CopyFn | None, touched: list[str]) -> None:
    for e in header.entries:
        touched.append(e.name)
        _apply_bytes(targets[e.name], np.frombuffer(blob, np.uint8, e.nbytes, e.start), e.dtype, e.shape, copy_fn)


def _apply_file(src: Source, i: int, url: str, targets, copy_fn: CopyFn | None, h, touched: list[str],
                bar) -> None:
    path, header = src.files[i], src.headers[i]
    try:
        f = open(path, "rb", buffering=0)  # unbuffered: readinto lands in the parameter itself
    except FileNotFoundError:
        raise disappeared(url) from None
    with f:
        if os.fstat(f.fileno()).st_size != header.file_size:
            raise TornSnapshotError(url, f"is {os.fstat(f.fileno()).st_size} bytes now, {header.file_size} when it "
                                    "was checked (replaced while loading?)")
        head = bytearray(header.data_start)
        _readinto(f, head, url)
        src.check_head(i, head)
        if h is not None:
            h.update(head)
        for e in header.entries:
            dst = targets[e.name]
            view = host_view(dst, e.dtype) if copy_fn is None else None
            buf = view if view is not None else np.empty(e.nbytes, np.uint8)
            if view is not None:
                touched.append(e.name)  # from here on its bytes may be half old, half new
            f.seek(e.start)
            step = HASH_WINDOW if h is not None else max(e.nbytes, 1)
            for start in range(0, e.nbytes, step):
                # hashed while the window is still in cache, not in a second pass
                window = buf[start:start + step]
                _readinto(f, window, url)
                if h is not None:
                    h.update(window)
            if view is None:
                touched.append(e.name)
                copy_converted(dst, buf, e.dtype, e.shape, copy_fn)
            bar.update(e.nbytes)


def _apply(src: Source, targets: Mapping[str, Any], verify: str, copy_fn: CopyFn | None,
           ready: Callable[[int], None] | None, bar) -> None:
    touched: list[str] = []
    if src.arrays is not None:
        index = src.index()
        try:
            for name, arr in src.arrays.items():
                raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
                touched.append(name)
                _apply_bytes(targets[name], raw, index[name][0], index[name][1], copy_fn)
                bar.update(raw.nbytes)
        except Exception as exc:
            raise PartialApplyError(f"{src.urls()[0]}: {type(exc).__name__}: {exc}", touched) from exc
        return
    urls = src.urls()
    url = urls[0]
    try:
        for i, blob in _fetch_parts(src, ready):
            url, expected = urls[i], (src.checksums[i] if verify != "none" else None)
            h = xxhash.xxh3_128() if expected else None
            if blob is None:
                _apply_file(src, i, url, targets, copy_fn, h, touched, bar)
            else:
                if len(blob) != src.sizes[i]:
                    raise TornSnapshotError(url, f"read {len(blob)} bytes, expected {src.sizes[i]} (changed while "
                                            "loading?)")
                src.check_head(i, memoryview(blob))
                if h is not None:
                    h.update(blob)
                    if h.hexdigest() != expected:  # a fetched part is checked before any of it is applied
                        raise TornSnapshotError(url, "checksum does not match the manifest (corrupt or replaced): "
                                                "publish the version again")
                _apply_blob(blob, src.headers[i], targets, copy_fn, touched)
                bar.update(len(blob))
            if h is not None and h.hexdigest() != expected:
                raise TornSnapshotError(url, "checksum does not match the manifest (corrupt, or replaced while "
                                        "loading): publish the version again")
    except Exception as exc:
        if not touched:
            err = storage_error(exc)
            if err is not exc:
                raise err from exc
            if isinstance(exc, (TornSnapshotError, OSError)):
                raise
            raise TornSnapshotError(url, f"{type(exc).__name__}: {exc}") from exc
        raise PartialApplyError(str(exc) if isinstance(exc, TornSnapshotError) else f"{url}: {exc}", touched) from exc


def _download(src: Source, i: int, url: str, path: str) -> None:
    try:
        src.fs.get_file(src.files[i], path)
    except FileNotFoundError:
        raise disappeared(url) from None
    if os.path.getsize(path) != src.sizes[i]:
        raise TornSnapshotError(url, f"downloaded {os.path.getsize(path)} bytes, expected {src.sizes[i]} (replaced "
                                "while loading?)")


@contextlib.contextmanager
def _spooled(src: Source, streams: int) -> Iterator[tuple[Source, Callable[[int], None] | None]]:
    """Remote parts downloaded once, ``streams`` at a time, into a local temporary directory (``TMPDIR``), as
    a local source plus ``ready(i)``, which returns once part i is there. Applying part i overlaps downloading
    the next ones, memory stays at the hash window, and ``verify="full"`` hashes the local copies before the
    first write instead of fetching twice. Local sources come back as they are; a temporary directory without
    room for the snapshot gives ``ready=None`` (the caller fetches into memory, two parts at a time)."""
    if is_local(src.fs) or src.arrays is not None:
        yield src, lambda i: None
        return
    with tempfile.TemporaryDirectory(prefix="baton-spool-") as tmp:
        if shutil.disk_usage(tmp).free < src.bytes + (256 << 20):
            log.warning("no room in %s for %d bytes of parts: fetching them into memory, two at a time", tmp,
                        src.bytes)
            yield src, None
            return
        paths, urls = [os.path.join(tmp, f"part{i}") for i in range(len(src.files))], src.urls()
        pool = ThreadPoolExecutor(max(1, streams), thread_name_prefix="baton-spool")
        try:
            futures = [pool.submit(_download, src, i, url, path) for i, (url, path) in enumerate(zip(urls, paths))]
            local = dataclasses.replace(src, fs=fsspec.filesystem("file"), files=paths, origin=urls)
            yield local, lambda i: futures[i].result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # nothing writes into the directory once it is removed


def _check_heads(src: Source, ready: Callable[[int], None] | None) -> None:
    """Every remote file's own header against the one its manifest records, once all are downloaded (or, fetched
    into memory, by a ranged read each) and before the first write: ``resolve`` took the layout from the records
    without probing the files, and a corrupt header is refused here with the target untouched, as a probe did."""
    if src.manifest is None:
        return
    starts = [h.data_start for h in src.headers]
    if ready is None:
        heads = src.fs.cat_ranges(src.files, [0] * len(starts), starts)
    else:
        heads = []
        for i, (path, start) in enumerate(zip(src.files, starts)):
            ready(i)
            with open(path, "rb") as f:
                heads.append(f.read(start))
    for i, head in enumerate(heads):
        if isinstance(head, FileNotFoundError):
            raise disappeared(src.urls()[i])
        if isinstance(head, BaseException):
            raise head
        src.check_head(i, head)


@storage_calls
def check_source(src: Source, into: Target, *, verify: str = "stream", cast: bool = False, prefetch: int = 8) -> None:
    """Everything that can be known before a byte of ``into`` changes: names, shapes and dtypes fit, every target
    is writable, and with ``verify="full"`` every part's checksum. A server checks every rank's source this way
    before applying any."""
    where = src.urls()[0] + (f" (+{len(src.files) - 1} more parts)" if len(src.files) > 1 else "")
    check_targets(src.index(), target_table(into), where, cast)
    if verify == "full" and any(src.checksums):
        src.verify(prefetch)


@storage_calls
def apply_source(
    src: Source, into: Target | None, *, verify: str = "stream", cast: bool = False, copy_fn: CopyFn | None = None,
    prefetch: int = 8, progress: bool = False, label: str = "load",
) -> tuple[dict[str, Any], str]:
    """Check ``src`` against the target, verify, apply; returns the target table and what was verified.
    ``prefetch``: remote parts downloaded at once into the local spool."""
    index = src.index()
    if into is None:
        paddle = paddle_eager()

        targets = {n: paddle.empty(list(shape), dtype=DTYPE_CODES[code][1]) for n, (code, shape) in index.items()}
    else:
        targets = target_table(into)
    has_checksums = any(src.checksums)
    check_source(src, targets, verify="none", cast=cast)  # before a byte is downloaded
    with _spooled(src, prefetch) as (local, ready):
        if not is_local(src.fs) and src.arrays is None:
            _check_heads(local, ready)
        if verify == "full" and has_checksums:
            if ready is not None:  # every part local before the hash pass
                for i in range(len(local.files)):
                    ready(i)
            local.verify(prefetch)
        with tqdm(total=src.bytes, unit="B", unit_scale=True, desc=label, disable=not progress) as bar:
            try:
                _apply(local, targets, verify, copy_fn, ready, bar)
            except PartialApplyError as exc:
                if into is None and isinstance(exc.__cause__, (TornSnapshotError, OSError)):
                    raise exc.__cause__ from None  # fresh tensors, never returned: nothing to restore
                raise
    if not has_checksums or verify == "none":
        verified = "sizes and headers only" + ("" if has_checksums else " (no manifest: no checksums to check)")
    else:
        verified = "xxh3_128 before apply" if verify == "full" else "xxh3_128 while applying"
    return targets, verified
