"""The bytes of one tensor's delta: which elements changed bits since the base, and by which bits.

A small optimizer step changes a few percent of the elements, almost all by their last mantissa bits; so per
window of ``WINDOW`` elements the encoding keeps the gaps between changed elements (uint32) and each changed
element's XOR with its base, every value split into byte planes (all low bytes, then all second bytes, ...),
compressed as one zstd frame. Sparse planes are smaller than a compressed XOR of everything, and applying touches
only the changed elements instead of decompressing a full-size XOR stream (``bench/delta_bench.py`` measures
both). Values are compared and applied as raw words, never as floats, so every dtype (NaNs, -0.0, ints) comes back
bit-exact.

A tensor's blob: ``u64 frame length`` per window (0: nothing changed there), then the frames. A frame
decompresses to ``u32 k`` then ``4*k`` gap bytes then ``w*k`` XOR bytes (``w`` the element width). Decoding
checks every length and keeps every position inside its window, so hostile bytes cannot write outside the
tensor or inflate past one window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import numba
import numba.extending
import numpy as np
import zstandard

from .cores import each
from .digest import ADD, MUL

WINDOW = 1 << 22  # elements per frame: a window's planes stay at (4 + w) * 4 Mi bytes at most
LEVEL = 1  # zstd level: the planes are small already, higher levels cost time for little size
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


class DeltaFormatError(ValueError):
    """A delta blob that does not decode to its own windows (corrupt, truncated or forged)."""


def words(raw: np.ndarray, width: int) -> np.ndarray:
    """A flat byte array as unsigned words of ``width`` bytes (the element's raw bits)."""
    return raw.view(_WORDS[width])


@numba.extending.intrinsic
def _prefetch(typingctx, array, index):  # pragma: no cover - compiled into the loops below
    """``_prefetch(array, i)``: asks the CPU to start loading ``array[i]``'s cache line for writing, without waiting
    for it. The apply's positions are known a few dozen changes ahead, and a changed element's line is rarely in
    cache (a 2% delta on bf16 touches about half of a tensor's lines), so without it each change waits on memory."""
    from llvmlite import ir
    from numba.core import cgutils

    def codegen(context, builder, signature, args):
        kind = signature.args[0]
        array = context.make_array(kind)(context, builder, args[0])
        at = cgutils.get_item_pointer(context, builder, kind, array, [args[1]], wraparound=False)
        byte, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        name = "llvm.prefetch.p0" if getattr(byte, "is_opaque", False) else "llvm.prefetch.p0i8"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte] + [i32] * 3), name)
        builder.call(fn, [builder.bitcast(at, byte), i32(1), i32(3), i32(1)])  # write, keep in cache, data
        return context.get_dummy_value()

    return numba.types.void(array, index), codegen


AHEAD = 32  # changes prefetched ahead: enough lines in flight to cover memory latency (bench/delta_bench.py)


@numba.njit(cache=True, nogil=True)
def _scan(base, new, lo, hi, lanes, bits, gaps, xors, update):  # pragma: no cover - compiled
    """Changed elements of window [lo, hi) (element indices) into ``gaps``/``xors``; returns how many. ``base`` and
    ``new`` are 64-bit words of ``lanes`` elements each (``bits`` wide): equal words, the common case, cost one
    compare for all their elements. With ``update`` the base takes the new words."""
    mask = (np.uint64(1) << np.uint64(bits)) - np.uint64(1) if bits < 64 else ~np.uint64(0)
    k, last = 0, lo - 1
    for j in range(lo // lanes, hi // lanes):
        x = base[j] ^ new[j]
        if x == 0:
            continue
        for lane in range(lanes):
            sub = (x >> np.uint64(lane * bits)) & mask
            if sub != 0:
                i = j * lanes + lane
                gaps[k] = i - last - 1
                xors[k] = sub
                last = i
                k += 1
        if update:
            base[j] = new[j]
    return k


def _planes(k: int, width: int, gaps: np.ndarray, xors: np.ndarray) -> np.ndarray:
    """``u32 k``, then the gaps' 4 byte planes, then the XORs' ``width`` byte planes."""
    plane = np.empty(4 + (4 + width) * k, np.uint8)
    plane[:4] = np.array([k], "<u4").view(np.uint8)
    plane[4:4 + 4 * k].reshape(4, k)[:] = gaps[:k].view(np.uint8).reshape(k, 4).T
    plane[4 + 4 * k:].reshape(width, k)[:] = xors[:k].view(np.uint8).reshape(k, 8)[:, :width].T
    return plane


@numba.njit(cache=True, nogil=True)
def _gap(plane, k, j):  # pragma: no cover - compiled
    """Change ``j``'s gap from the four byte planes."""
    return np.int64(plane[4 + j]) | (np.int64(plane[4 + k + j]) << 8) | (np.int64(plane[4 + 2 * k + j]) << 16) | \
        (np.int64(plane[4 + 3 * k + j]) << 24)


@numba.njit(cache=True, nogil=True)
def _apply(target, lo, hi, plane, k, width, weigh, mul, add):  # pragma: no cover - compiled
    """XORs a window's changes into ``target`` (its elements as unsigned words); returns (0, the change to the
    target's ``sum64`` when ``weigh``: each changed word's ``(new - old) * (i * mul + add)`` summed mod 2**64), or
    (-1, 0) at the first position outside the window, which is never written. Positions are decoded ``AHEAD``
    changes before they are written, into a ring, so their lines are prefetched while earlier changes apply."""
    ring = np.empty(2 * AHEAD, np.int64)
    ahead = lo - 1
    for j in range(min(AHEAD, k)):
        ahead += _gap(plane, k, j) + 1
        ring[j % (2 * AHEAD)] = ahead
        if ahead < hi:
            _prefetch(target, ahead)
    xor_at, total = 4 + 4 * k, np.uint64(0)
    for j in range(k):
        if j + AHEAD < k:
            ahead += _gap(plane, k, j + AHEAD) + 1
            ring[(j + AHEAD) % (2 * AHEAD)] = ahead
            if ahead < hi:
                _prefetch(target, ahead)
        i = ring[j % (2 * AHEAD)]
        if i >= hi:
            return -1, np.uint64(0)
        x = np.uint64(0)
        for b in range(width):
            x |= np.uint64(plane[xor_at + b * k + j]) << np.uint64(8 * b)
        old = np.uint64(target[i])
        new = old ^ x
        target[i] = new
        if not weigh:
            continue
        if width == 8:  # sum64 reads an 8-byte element as two 32-bit words, 2*i and 2*i + 1
            w = np.uint64(i) * np.uint64(2)
            low = (new & np.uint64(0xFFFFFFFF)) - (old & np.uint64(0xFFFFFFFF))
            high = (new >> np.uint64(32)) - (old >> np.uint64(32))
            total += low * (w * mul + add) + high * ((w + np.uint64(1)) * mul + add)
        else:
            total += (new - old) * (np.uint64(i) * mul + add)
    return 0, total


def weighed_change(index: np.ndarray, old: np.ndarray, xors: np.ndarray, width: int) -> int:
    """The change to a tensor's ``sum64`` when its ``width``-byte elements at ``index`` (from ``changes``), whose
    words were ``old``, take ``xors``: ``sum((new - old) * (i * MUL + ADD)) mod 2**64`` over the changed words only
    (an 8-byte element is two 32-bit words to ``sum64``, ``2i`` and ``2i + 1``)."""
    old = old.astype(np.uint64)
    new, at = old ^ xors, index.astype(np.uint64)
    mul, add = np.uint64(MUL), np.uint64(ADD)
    with np.errstate(over="ignore"):
        if width != 8:
            return int(((new - old) * (at * mul + add)).sum(dtype=np.uint64))
        low, shift, at = np.uint64(0xFFFFFFFF), np.uint64(32), at * np.uint64(2)
        lows = ((new & low) - (old & low)) * (at * mul + add)
        highs = ((new >> shift) - (old >> shift)) * ((at + np.uint64(1)) * mul + add)
        return int((lows + highs).sum(dtype=np.uint64))


def encode(base: np.ndarray, new: np.ndarray, width: int, update: bool = False) -> bytes | None:
    """The delta blob taking ``base``'s bytes to ``new``'s (flat uint8 arrays of one tensor), or None when they
    are equal. With ``update``, ``base`` (writable) ends holding ``new``: a trainer's cache costs no second pass.
    Windows are encoded two at a time (the scan and zstd release the GIL)."""
    if base.nbytes % 8:  # compared 8 bytes at a time: a size that is not a multiple is padded with equal zeros
        tail = np.zeros(8 - base.nbytes % 8, np.uint8)
        blob = encode(np.concatenate([base, tail]), np.concatenate([new, tail]), width)
        if update:
            np.copyto(base, new)
        return blob
    b, n = base.view(np.uint64), new.view(np.uint64)
    elements, lanes = new.nbytes // width, 8 // width
    windows = range(0, elements, WINDOW)

    def one(lo: int) -> bytes:
        hi = min(lo + WINDOW, elements)
        gaps, xors = _scratch(hi - lo)
        k = _scan(b, n, lo, hi, lanes, 8 * width, gaps, xors, update)
        if k == 0:
            return b""
        return zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compress(_planes(k, width, gaps, xors))

    frames = each(one, windows)
    if not any(frames):
        return None
    return np.asarray([len(f) for f in frames], "<u8").tobytes() + b"".join(frames)


def _scratch(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Gap and XOR buffers for one window of ``size`` elements."""
    return np.empty(size, np.uint32), np.empty(size, np.uint64)


def _windows(blob: bytes | memoryview, elements: int) -> tuple[memoryview, list[tuple[int, int, int]]]:
    """The blob and its non-empty windows ``(window, start, size)``, after checking its table of lengths."""
    windows = -(-elements // WINDOW)
    view = memoryview(blob).cast("B")
    if len(view) < 8 * windows:
        raise DeltaFormatError(f"blob of {len(view)} bytes is shorter than its table of {windows} windows")
    lengths = np.frombuffer(view, "<u8", windows).astype(np.int64)
    if lengths.min(initial=0) < 0 or 8 * windows + int(lengths.sum()) != len(view):
        raise DeltaFormatError(f"window lengths add up to {8 * windows + int(lengths.sum())} bytes, the blob is "
                               f"{len(view)}")
    starts = (8 * windows + np.concatenate([[0], np.cumsum(lengths)[:-1]])).tolist()
    return view, [(w, start, size) for w, (start, size) in enumerate(zip(starts, lengths.tolist())) if size]


def _frame(view: memoryview, job: tuple[int, int, int], elements: int, width: int) -> tuple[int, int, np.ndarray, int]:
    """Window ``job``'s planes decompressed and checked: ``(lo, hi, plane, k)``, its element range, its bytes and its
    number of changes."""
    w, start, size = job
    lo, hi = w * WINDOW, min((w + 1) * WINDOW, elements)
    limit, frame = 4 + (4 + width) * (hi - lo), view[start:start + size]
    try:  # the declared size is checked first: decompress() would allocate whatever a frame declares
        declared = zstandard.frame_content_size(frame)
        if not 0 < declared <= limit:
            raise DeltaFormatError(f"window {w}: a frame declaring {declared} bytes, over the window's {limit}")
        plane = np.frombuffer(zstandard.ZstdDecompressor().decompress(frame), np.uint8)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"window {w}: {exc}") from None
    if plane.size < 4:
        raise DeltaFormatError(f"window {w}: {plane.size} bytes, too short for its count")
    k = int(plane[:4].view("<u4")[0])
    if k == 0 or k > hi - lo or plane.size != 4 + (4 + width) * k:
        raise DeltaFormatError(f"window {w}: {plane.size} bytes for {k} changes of {width}-byte elements")
    return lo, hi, plane, k


def apply(target: np.ndarray, blob: bytes | memoryview, width: int, weigh: bool = False) -> int | None:
    """XORs ``blob`` (from ``encode``) into ``target``, a writable flat uint8 array holding the base's bytes. With
    ``weigh``, returns the change to ``target``'s ``sum64`` (``storage.digest``), read from the changed elements
    only: the new ``sum64`` is the old one plus it, mod 2**64."""
    return apply_many({"": (target, blob, width)}, weigh)[""]


def apply_many(items: Mapping[str, tuple[np.ndarray, bytes | memoryview, int]],
               weigh: bool = False) -> dict[str, int | None]:
    """``apply`` over several tensors (name -> (target, blob, width)), their windows decoded and applied on both
    cores. Every blob's table is checked before anything is written; a window that does not decode raises a
    ``DeltaFormatError`` naming its tensor once every other window has been applied."""
    jobs = []
    for name, (target, blob, width) in items.items():
        with _naming(name):
            view, windows = _windows(blob, target.size // width)
        jobs += [(name, view, window) for window in windows]
    mul, add = np.uint64(MUL), np.uint64(ADD)

    def one(job: tuple[str, memoryview, tuple[int, int, int]]) -> tuple[str, int]:
        name, view, window = job
        target, _, width = items[name]
        with _naming(name):
            lo, hi, plane, k = _frame(view, window, target.size // width, width)
            status, total = _apply(words(target, width), lo, hi, plane, k, width, weigh, mul, add)
            if status < 0:
                raise DeltaFormatError(f"window {window[0]}: a change falls outside the window")
        return name, int(total)

    totals = dict.fromkeys(items, 0)
    for name, total in each(one, jobs):
        totals[name] += total
    return {name: total % 2**64 if weigh else None for name, total in totals.items()}


@contextlib.contextmanager
def _naming(name: str) -> Iterator[None]:
    """A ``DeltaFormatError`` inside says which tensor's blob it came from (when it has a name)."""
    try:
        yield
    except DeltaFormatError as exc:
        raise DeltaFormatError(f"{name}: {exc}" if name else str(exc)) from None


def changes(blob: bytes | memoryview, elements: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """What ``blob`` changes in a tensor of ``elements`` elements of ``width`` bytes, decoded but not applied:
    the changed elements' indices (int64, increasing) and their XORs (uint64 holding ``width``-byte words). A device
    applies these where the tensor lives, so only the changes cross from the host. Checked as ``apply`` checks."""
    view, jobs = _windows(blob, elements)
    indices, xors = [np.empty(0, np.int64)], [np.empty(0, np.uint64)]
    for job in jobs:
        lo, hi, plane, k = _frame(view, job, elements, width)
        gaps = plane[4:4 + 4 * k].reshape(4, k).astype(np.int64)
        at = lo - 1 + np.cumsum((gaps[0] | gaps[1] << 8 | gaps[2] << 16 | gaps[3] << 24) + 1)
        if at[-1] >= hi:
            raise DeltaFormatError(f"window {job[0]}: a change falls outside the window")
        planes = plane[4 + 4 * k:].reshape(width, k).astype(np.uint64)
        indices.append(at)
        xors.append(np.bitwise_or.reduce([planes[b] << np.uint64(8 * b) for b in range(width)], axis=0))
    return np.concatenate(indices), np.concatenate(xors)
