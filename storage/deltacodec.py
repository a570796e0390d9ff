"""The bytes of one tensor's delta: which elements changed bits since the base, and by which bits.

A small optimizer step changes a few percent of the elements, almost all by their last mantissa bits; so per
window of ``WINDOW`` elements the encoding keeps, for each changed element in order, the gap since the previous
change and its XOR with its base, as LEB128 varints (a gap under 128 and a last-bits XOR take one byte each): all
the gaps, then all the XORs, compressed as one zstd frame. Applying decodes both streams in one pass and touches
only the changed elements. Varints inflate to well under half the bytes of the byte planes format_version 2 kept,
in about as many compressed bytes (``bench/delta_bench.py``). Values are compared and applied as raw words, never
as floats, so every dtype (NaNs, -0.0, ints) comes back bit-exact.

A tensor's blob: ``u64 frame length`` per window (0: nothing changed there), then the frames. A frame
decompresses to ``u32 k | PACKED``, ``u32 g``, then ``k`` gap varints in ``g`` bytes, then ``k`` XOR varints. A
frame whose count lacks the ``PACKED`` bit is format_version 2's: ``u32 k``, the gaps as 4 byte planes, the XORs as
``w`` byte planes (``w`` the element width); it is still read, turned into varints first. Decoding checks every
length and keeps every position inside its window, so hostile bytes cannot write outside the tensor or inflate
past one window.
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

WINDOW = 1 << 22  # elements per frame: a window's varints stay under (5 + 10) * 4 Mi bytes
LEVEL = 1  # zstd level: the varints are small already, higher levels cost time for little size
PACKED = 1 << 31  # the count's top bit: the frame holds varints (format_version 3), not byte planes (2)
_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_GAP_BYTES = 5  # the longest varint of a u32 gap (format_version 2's planes held any; the window bounds them)
OUTSIDE, MALFORMED = -1, -2  # what the loops below return at a change they refuse (never written)


class DeltaFormatError(ValueError):
    """A delta blob that does not decode to its own windows (corrupt, truncated or forged)."""


def words(raw: np.ndarray, width: int) -> np.ndarray:
    """A flat byte array as unsigned words of ``width`` bytes (the element's raw bits)."""
    return raw.view(_WORDS[width])


def _most(width: int, k: int) -> int:
    """The most bytes a frame of ``k`` changes of ``width``-byte elements inflates to."""
    return 8 + (_GAP_BYTES + _xor_bytes(width)) * k


@numba.njit(cache=True, nogil=True)
def _xor_bytes(width):  # pragma: no cover - compiled (and called from Python)
    """The longest varint of a ``width``-byte XOR: 7 bits a byte."""
    return (8 * width + 6) // 7


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
_RING = 2 * AHEAD  # decoded changes waiting to be written (a power of two: the slot is a mask)


@numba.njit(cache=True, nogil=True)
def _put(out, p, value):  # pragma: no cover - compiled
    """Writes ``value`` (uint64) as a LEB128 varint at ``out[p]``; returns where the next one goes."""
    while value >= np.uint64(128):
        out[p] = (value & np.uint64(127)) | np.uint64(128)
        value >>= np.uint64(7)
        p += 1
    out[p] = value
    return p + 1


@numba.njit(cache=True, nogil=True, inline="always")
def _get(s, p, most, end):  # pragma: no cover - compiled
    """The LEB128 varint at ``s[p]`` and where the next one starts, or ``(0, -1)`` when it runs to ``end`` or past
    ``most`` bytes."""
    value, shift, end = np.uint64(0), np.uint64(0), min(end, p + most)
    while p < end:
        b = np.uint64(s[p])
        p += 1
        value |= (b & np.uint64(127)) << shift
        if b < np.uint64(128):
            return value, p
        shift += np.uint64(7)
    return np.uint64(0), -1


@numba.njit(cache=True, nogil=True, inline="always")
def _gaps_end(s):  # pragma: no cover - compiled
    """Where a frame's gaps end and its XORs start: after the 8-byte head, its second ``u32`` bytes on."""
    return 8 + (np.int64(s[4]) | np.int64(s[5]) << 8 | np.int64(s[6]) << 16 | np.int64(s[7]) << 24)


@numba.njit(cache=True, nogil=True, inline="always")
def _next(s, p, q, mid, last, hi, width):  # pragma: no cover - compiled
    """The change after position ``last``, its gap at ``s[p]`` (before ``mid``) and its XOR at ``s[q]``:
    ``(0, position, XOR, next p, next q)``, or ``(OUTSIDE or MALFORMED, ...)`` for a position at or past ``hi`` or a
    varint that does not decode (truncated, too long, or an XOR wider than the element)."""
    gap, p = _get(s, p, _GAP_BYTES, mid)
    start = q
    x, q = _get(s, q, _xor_bytes(width), s.size)
    if p < 0 or q < 0:
        return MALFORMED, 0, np.uint64(0), p, q
    if x >> np.uint64(8 * width) != 0 if width < 8 else q - start == 10 and s[q - 1] > 1:
        return MALFORMED, 0, np.uint64(0), p, q  # wider than the element (an 8-byte XOR's 10th byte holds bit 63)
    at = last + 1 + np.int64(gap)
    if at >= hi:
        return OUTSIDE, 0, np.uint64(0), p, q
    return 0, at, x, p, q


@numba.njit(cache=True, nogil=True)
def _scan(base, new, lo, hi, lanes, bits, gaps, xors, update):  # pragma: no cover - compiled
    """Changed elements of window [lo, hi) (element indices): their gaps as varints into ``gaps``, their XORs into
    ``xors``; returns how many and the bytes of each. ``base`` and ``new`` are 64-bit words of ``lanes`` elements
    each (``bits`` wide): equal words, the common case, cost one compare for all their elements. With ``update`` the
    base takes the new words."""
    mask = (np.uint64(1) << np.uint64(bits)) - np.uint64(1) if bits < 64 else ~np.uint64(0)
    k, last, p, q = 0, lo - 1, 0, 0
    for j in range(lo // lanes, hi // lanes):
        x = base[j] ^ new[j]
        if x == 0:
            continue
        for lane in range(lanes):
            sub = (x >> np.uint64(lane * bits)) & mask
            if sub != 0:
                i = j * lanes + lane
                p = _put(gaps, p, np.uint64(i - last - 1))
                q = _put(xors, q, sub)
                last = i
                k += 1
        if update:
            base[j] = new[j]
    return k, p, q


@numba.njit(cache=True, nogil=True)
def _repack(plane, k, width, gaps, xors):  # pragma: no cover - compiled
    """A format_version 2 frame's byte planes (``u32 k``, gaps, then XORs) as varints into ``gaps`` and ``xors``;
    returns the bytes of each."""
    p, q = 0, 0
    for j in range(k):
        gap, x = np.uint64(0), np.uint64(0)
        for b in range(4):
            gap |= np.uint64(plane[4 + b * k + j]) << np.uint64(8 * b)
        for b in range(width):
            x |= np.uint64(plane[4 + 4 * k + b * k + j]) << np.uint64(8 * b)
        p, q = _put(gaps, p, gap), _put(xors, q, x)
    return p, q


@numba.njit(cache=True, nogil=True, inline="always")
def _xor(target, i, x, width, weigh, mul, add):  # pragma: no cover - compiled
    """XORs ``x`` into ``target[i]``; returns the change to the ``sum64`` when ``weigh`` (else 0)."""
    old = np.uint64(target[i])
    new = old ^ x
    target[i] = new
    if not weigh:
        return np.uint64(0)
    if width == 8:  # sum64 reads an 8-byte element as two 32-bit words, 2*i and 2*i + 1
        w = np.uint64(i) * np.uint64(2)
        low = (new & np.uint64(0xFFFFFFFF)) - (old & np.uint64(0xFFFFFFFF))
        high = (new >> np.uint64(32)) - (old >> np.uint64(32))
        return low * (w * mul + add) + high * ((w + np.uint64(1)) * mul + add)
    return (new - old) * (np.uint64(i) * mul + add)


@numba.njit(cache=True, nogil=True)
def _apply(target, lo, hi, s, k, width, weigh, mul, add):  # pragma: no cover - compiled
    """XORs a window's ``k`` changes (frame ``s``) into ``target`` (its elements as unsigned words); returns (0, the
    change to the target's ``sum64`` when ``weigh``: each changed word's ``(new - old) * (i * mul + add)`` summed mod
    2**64), or (OUTSIDE or MALFORMED, 0) at the first change refused, or MALFORMED when either stream does not end
    at its last varint; a refused change and the ones after it are never written. Changes are decoded ``AHEAD``
    before they are written, into a ring, so their lines are prefetched while earlier changes apply."""
    at, xs = np.empty(_RING, np.int64), np.empty(_RING, np.uint64)
    mid = _gaps_end(s)
    p, q, i, total = 8, mid, lo - 1, np.uint64(0)
    for j in range(k + AHEAD):
        if j < k:
            status, i, x, p, q = _next(s, p, q, mid, i, hi, width)
            if status == 0 and j == k - 1 and (p != mid or q != s.size):
                status = MALFORMED
            if status != 0:
                return status, np.uint64(0)
            at[j & (_RING - 1)], xs[j & (_RING - 1)] = i, x
            _prefetch(target, i)
        if j >= AHEAD:
            m = (j - AHEAD) & (_RING - 1)
            total += _xor(target, at[m], xs[m], width, weigh, mul, add)
    return 0, total


@numba.njit(cache=True, nogil=True)
def _unpack(s, k, lo, hi, width, index, xors):  # pragma: no cover - compiled
    """A window's ``k`` changes into ``index`` (positions) and ``xors``; returns 0, or what ``_apply`` refuses."""
    mid = _gaps_end(s)
    p, q, i = 8, mid, lo - 1
    for j in range(k):
        status, i, x, p, q = _next(s, p, q, mid, i, hi, width)
        if status != 0:
            return status
        index[j], xors[j] = i, x
    return 0 if p == mid and q == s.size else MALFORMED


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
        out, xors = _buffers(width, hi - lo)
        k, gaps, size = _scan(b, n, lo, hi, lanes, 8 * width, out[8:], xors, update)
        if k == 0:
            return b""
        return zstandard.ZstdCompressor(level=LEVEL, write_checksum=True).compress(_frame_of(out, k, gaps, xors[:size]))

    frames = each(one, windows)
    if not any(frames):
        return None
    return np.asarray([len(f) for f in frames], "<u8").tobytes() + b"".join(frames)


def _buffers(width: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A frame's buffer (head, then gaps) and an XOR buffer for ``size`` changes at most; pages never written are
    never committed."""
    return np.empty(_most(width, size), np.uint8), np.empty(_xor_bytes(width) * size, np.uint8)


def _frame_of(out: np.ndarray, k: int, gaps: int, xors: np.ndarray) -> np.ndarray:
    """``out``'s frame: the head written, the XORs copied after the ``gaps`` bytes of gaps."""
    out[:8] = np.array([k | PACKED, gaps], "<u4").view(np.uint8)
    out[8 + gaps:8 + gaps + xors.size] = xors
    return out[:8 + gaps + xors.size]


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
    """Window ``job``'s frame decompressed and checked: ``(lo, hi, frame, k)``, its element range, its bytes and its
    number of changes. A format_version 2 frame's planes are turned into varints here."""
    w, start, size = job
    lo, hi = w * WINDOW, min((w + 1) * WINDOW, elements)
    limit, frame = _most(width, hi - lo), view[start:start + size]
    try:  # the declared size is checked first: decompress() would allocate whatever a frame declares
        declared = zstandard.frame_content_size(frame)
        if not 0 < declared <= limit:
            raise DeltaFormatError(f"window {w}: a frame declaring {declared} bytes, over the window's {limit}")
        raw = np.frombuffer(zstandard.ZstdDecompressor().decompress(frame), np.uint8)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"window {w}: {exc}") from None
    if raw.size < 4:
        raise DeltaFormatError(f"window {w}: {raw.size} bytes, too short for its count")
    head = int(raw[:4].view("<u4")[0])
    k, packed = head & ~PACKED, bool(head & PACKED)
    if packed:  # the gaps' bytes must leave a byte for each XOR
        fits = 8 + 2 * k <= raw.size <= _most(width, k) and k <= int(raw[4:8].view("<u4")[0]) <= raw.size - 8 - k
    else:
        fits = raw.size == 4 + (4 + width) * k
    if k == 0 or k > hi - lo or not fits:
        raise DeltaFormatError(f"window {w}: {raw.size} bytes for {k} changes of {width}-byte elements")
    if packed:
        return lo, hi, raw, k
    out, xors = _buffers(width, k)
    gaps, size = _repack(raw, k, width, out[8:], xors)
    return lo, hi, _frame_of(out, k, gaps, xors[:size]), k


def _refused(window: int, status: int) -> DeltaFormatError:
    return DeltaFormatError(f"window {window}: " + ("a change falls outside the window" if status == OUTSIDE else
                            "a change that does not decode (truncated, too long, wider than its element, or bytes "
                            "after the last)"))


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
            lo, hi, frame, k = _frame(view, window, target.size // width, width)
            status, total = _apply(words(target, width), lo, hi, frame, k, width, weigh, mul, add)
            if status < 0:
                raise _refused(window[0], status)
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
        lo, hi, frame, k = _frame(view, job, elements, width)
        indices.append(np.empty(k, np.int64))
        xors.append(np.empty(k, np.uint64))
        status = _unpack(frame, k, lo, hi, width, indices[-1], xors[-1])
        if status < 0:
            raise _refused(job[0], status)
    return np.concatenate(indices), np.concatenate(xors)
