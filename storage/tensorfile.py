"""Tensors as bytes: the one table of dtype codes, a tensor's bytes on the host, and the safetensors byte layout,
read and written without a second copy of the data.

Layout: 8-byte little-endian header length, a JSON header (``{name: {dtype, shape, data_offsets}}`` plus an
optional ``__metadata__`` string map) padded with spaces to 8 bytes, then the tensor bytes back to back with
no holes. This is what ``safetensors.paddle.save_file`` writes and what ``paddle.load(path, safetensors=True)``
reads; Baton writes it itself so that tensors stream straight from the live buffers to storage and back into
live parameters, and checks every header field before trusting it.
"""

from __future__ import annotations

import codecs
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import numpy as np

from .errors import TornSnapshotError

# safetensors dtype code -> (numpy dtype holding the raw bits, paddle dtype name)
DTYPE_CODES: dict[str, tuple[np.dtype, str]] = {
    "BOOL": (np.dtype(np.bool_), "bool"),
    "U8": (np.dtype(np.uint8), "uint8"),
    "I8": (np.dtype(np.int8), "int8"),
    "I16": (np.dtype(np.int16), "int16"),
    "U16": (np.dtype(np.uint16), "uint16"),
    "F16": (np.dtype(np.float16), "float16"),
    "BF16": (np.dtype(np.uint16), "bfloat16"),
    "I32": (np.dtype(np.int32), "int32"),
    "U32": (np.dtype(np.uint32), "uint32"),
    "F32": (np.dtype(np.float32), "float32"),
    "F64": (np.dtype(np.float64), "float64"),
    "I64": (np.dtype(np.int64), "int64"),
    "U64": (np.dtype(np.uint64), "uint64"),
    "F8_E4M3": (np.dtype(np.uint8), "float8_e4m3fn"),
    "F8_E5M2": (np.dtype(np.uint8), "float8_e5m2"),
}
_BY_PADDLE = {paddle_name: code for code, (_, paddle_name) in DTYPE_CODES.items()}
# numpy has no bfloat16 nor float8: their bits are held as uint16 / uint8, which are U16 / U8 to numpy
_BY_NUMPY = {np_dtype: code for code, (np_dtype, _) in DTYPE_CODES.items()
             if code != "BF16" and not code.startswith("F8")}

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
MAX_DIMS = 64  # numpy's
MAX_EMPTY_TENSORS = 4096  # zero-size tensors a header may list beyond one per byte of data
HEADER_PROBE_BYTES = 64 << 10  # one read that holds the whole header of any ordinary part


def paddle_eager():
    """``paddle``, in eager (dygraph) mode on this thread. Paddle turns eager mode on only for the thread that
    imports it: a task thread that imports it first leaves every other thread making static-mode
    ``DenseTensor`` objects, which is what a publish on a second rank's thread got."""
    import paddle

    if not paddle.in_dynamic_mode():
        paddle.disable_static()
    return paddle


def code_of_paddle(dtype: object) -> str:
    name = str(dtype).removeprefix("paddle.")
    if name not in _BY_PADDLE:
        raise TypeError(f"dtype {dtype} has no safetensors code; cast it to a supported dtype before publishing")
    return _BY_PADDLE[name]


def code_of_numpy(dtype: np.dtype) -> str:
    if np.dtype(dtype) not in _BY_NUMPY:
        raise TypeError(f"numpy dtype {dtype} has no safetensors code; cast it before publishing")
    return _BY_NUMPY[np.dtype(dtype)]


def code_of(t: Any) -> str:
    """The dtype code of a numpy array or a Paddle tensor."""
    return code_of_numpy(t.dtype) if isinstance(t, np.ndarray) else code_of_paddle(t.dtype)


def code_of_saved(arr: Any) -> str:
    """The dtype code of an array (or a lazy one) that ``paddle.save`` wrote: it keeps bfloat16 as uint16, and
    Paddle reads those back as bfloat16, so Baton does too."""
    return "BF16" if arr.dtype == np.uint16 else code_of_numpy(arr.dtype)


def itemsize(code: str) -> int:
    return DTYPE_CODES[code][0].itemsize


def host_array(t: Any) -> np.ndarray:
    """``t``'s values on the host as numpy holding their raw bits (bfloat16 as uint16, float8 as uint8): ``t`` itself
    for a numpy array, the tensor's own memory for a contiguous CPU tensor (no copy of a large model), else a copy."""
    if isinstance(t, np.ndarray):
        return t
    paddle = paddle_eager()
    t = t.detach()
    code = code_of_paddle(t.dtype)
    if code == "BF16":
        t = t.view(paddle.uint16)
    elif code.startswith("F8"):
        t = t.view(paddle.uint8)
    if t.place.is_cpu_place() and t.is_contiguous() and 0 not in t.shape:
        return np.from_dlpack(t)
    return t.numpy()


def host_bytes(t: Any, code: str | None = None) -> np.ndarray:
    """``t``'s values as the raw bytes of dtype ``code`` (its own when None), flat uint8: ``t``'s own memory where it
    holds them already (read-only for a read-only array), else a host copy. A float tensor of another dtype than
    ``code`` holds a snapshot's values cast, and casting back gives their exact bits."""
    if isinstance(t, np.ndarray):
        if code == "BF16" and t.dtype != np.uint16:
            top = np.ascontiguousarray(t, np.float32).view(np.uint32) >> 16
            return top.astype(np.uint16).view(np.uint8).reshape(-1)
        t = t if code is None else t.astype(DTYPE_CODES[code][0], copy=False)
        return np.ascontiguousarray(t).reshape(-1).view(np.uint8)
    if code is not None and code_of_paddle(t.dtype) != code:
        t = t.detach().astype(DTYPE_CODES[code][1])
    return np.ascontiguousarray(host_array(t)).reshape(-1).view(np.uint8)


def host_view(t: Any, code: str) -> np.ndarray | None:
    """A writable flat byte view of ``t``'s own memory when bytes of dtype ``code`` can land there as they are."""
    if isinstance(t, np.ndarray):
        ok = t.flags.c_contiguous and t.flags.writeable and code_of_numpy(t.dtype) == code
        return t.reshape(-1).view(np.uint8) if ok else None
    if code_of_paddle(t.dtype) != code or not t.place.is_cpu_place() or not t.is_contiguous():
        return None
    paddle = paddle_eager()
    v = t.detach()
    if code == "BF16":
        v = v.view(paddle.uint16)
    elif code.startswith("F8"):
        v = v.view(paddle.uint8)
    if 0 in v.shape:  # not v.numel(): a Paddle comparison costs more than the rest of this function
        return np.empty(0, np.uint8)
    try:
        return np.from_dlpack(v).reshape(-1).view(np.uint8)
    except (BufferError, RuntimeError, TypeError):
        return None


def copy_converted(dst: Any, raw: np.ndarray, code: str, shape: tuple[int, ...], copy_fn: Any = None) -> None:
    """Writes bytes of dtype ``code`` into ``dst`` where they cannot land as they are: a dtype cast or a device copy
    (``copy_fn(live, loaded)`` when given), one tensor-sized temporary at most."""
    arr = raw.view(DTYPE_CODES[code][0]).reshape(shape)
    if isinstance(dst, np.ndarray):
        if code == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        np.copyto(dst, arr, casting="unsafe")
        return
    paddle = paddle_eager()
    src = paddle.to_tensor(arr, place=dst.place)
    if code == "BF16":
        src = src.view(paddle.bfloat16)
    elif code.startswith("F8"):
        src = src.view(getattr(paddle, DTYPE_CODES[code][1]))
    if copy_fn is not None:
        copy_fn(dst, src)
        return
    with paddle.no_grad():
        paddle.assign(src if src.dtype == dst.dtype else src.astype(dst.dtype), output=dst)


@dataclass(frozen=True)
class TensorRef:
    """A tensor that is read only when the part holding it is written (``storage.hf_tensors`` gives these), so
    publishing a checkpoint larger than memory holds about one part of it at a time."""

    code: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]  # its values (bfloat16 as 16-bit integers), C-contiguous


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    start: int  # offset of the first byte from the start of the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def array(self, buffer, start: int | None = None) -> np.ndarray:
        """The tensor over ``buffer`` (its raw bits' numpy dtype, no copy): the whole file's bytes, or with ``start``
        the tensor's bytes beginning at that offset."""
        np_dtype = DTYPE_CODES[self.dtype][0]
        offset = self.start if start is None else start
        return np.frombuffer(buffer, np_dtype, self.nbytes // np_dtype.itemsize, offset).reshape(self.shape)


@dataclass(frozen=True)
class Header:
    entries: tuple[TensorEntry, ...]  # in file order
    data_start: int
    file_size: int
    metadata: dict[str, str]


def encode_header(items: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str],
                  align: int = 8) -> bytes:
    """Header bytes (length prefix included) for tensors written back to back in the given order, padded with
    spaces so that the tensor bytes start at a multiple of ``align`` (8, or the page size for large parts)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, code, shape, nbytes in items:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % align)
    return struct.pack("<Q", len(raw)) + raw


def header_length(prefix: bytes, path: str, file_size: int) -> int:
    """The JSON length from the first 8 bytes, refused when it cannot be a safetensors header."""
    if file_size < 8 or len(prefix) < 8:
        raise TornSnapshotError(path, f"file is {file_size} bytes, too short for a safetensors header")
    (length,) = struct.unpack("<Q", prefix[:8])
    fits = length <= MAX_HEADER_BYTES and 8 + length <= file_size
    # Pickles start with 0x80, but so does a safetensors header of 128, 384, … bytes: only a JSON brace decides.
    if prefix[:1] == b"\x80" and not (fits and prefix[8:9] in (b"{", b"")):
        raise TornSnapshotError(
            path, "this is a pickle (paddle.save) file, but this level must hold safetensors bytes: "
            "re-save it with safetensors.paddle.save_file or `baton publish`")
    if not fits:
        raise TornSnapshotError(path, f"header length {length} does not fit in a {file_size}-byte file (truncated?)")
    return length


def parse_json(raw: bytes | str, path: str, what: str, object_pairs_hook=None) -> object:
    """JSON with bounded integers and nesting: a hostile document is refused, it never raises something else."""
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_constant=_no_constant, object_pairs_hook=object_pairs_hook)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise TornSnapshotError(path, f"{what} is not valid JSON ({reason})") from None


def _bounded_int(text: str) -> int:
    if len(text) > 20:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _no_constant(text: str) -> float:
    raise ValueError(f"{text} is not JSON")


def _compact(pairs: list[tuple[str, object]]) -> object:
    """Each JSON object as cheaply as it can be held: an entry ``{dtype, shape, data_offsets}`` becomes a tuple as
    soon as it is parsed, anything else stays the list of its pairs (a dict per tensor would cost ~10x the
    header's bytes; this keeps a hostile header of tiny entries near 5x)."""
    if len(pairs) == 3:
        d = dict(pairs)
        shape, offsets = d.get("shape"), d.get("data_offsets")
        if d.keys() == {"dtype", "shape", "data_offsets"} and type(shape) is list and type(offsets) is list:
            shape = tuple(shape)
            if len(_SHAPES) < 1 << 16:  # tensors share a few shapes: one tuple each, not one per entry
                shape = _SHAPES.setdefault(shape, shape)
            else:
                shape = _SHAPES.get(shape, shape)
            code = d["dtype"]
            return _Entry((_CODES.get(code, code) if type(code) is str else code, shape, *offsets))
    return _Pairs(pairs)


_CODES = {code: code for code in DTYPE_CODES}  # the dtype strings of every entry are these objects, not copies
_SHAPES: dict[tuple, tuple] = {}


class _Entry(tuple):
    __slots__ = ()


class _Pairs(list):
    __slots__ = ()


def _tensor_entry(name: str, info: object, data_start: int, file_size: int, path: str) -> TensorEntry:
    ok = isinstance(info, _Entry) and len(info) == 4
    if ok:
        code, shape, begin, end = info
        ok = type(code) is str and code in DTYPE_CODES and len(shape) <= MAX_DIMS
        ok = ok and all(type(d) is int and 0 <= d < 1 << 63 for d in shape)
        ok = ok and type(begin) is int and type(end) is int and 0 <= begin <= end <= file_size
    if not ok:
        raise TornSnapshotError(path, f"header entry {name[:80]!r} is malformed: expected "
                                "{dtype, shape, data_offsets} with a known dtype and sizes in range")
    count = 1
    for d in shape:  # bounded by the file, so a hostile shape never makes a huge integer
        count = min(count * d, file_size + 1)
    if count * itemsize(code) != end - begin:
        raise TornSnapshotError(path, f"tensor {name[:80]!r}: shape {list(shape)} {code} does not match "
                                f"{end - begin} bytes")
    return TensorEntry(name, code, shape, data_start + begin, data_start + end)


def parse_header(raw: bytes, path: str, file_size: int) -> Header:
    """Validate a header completely: dtypes, shapes, offsets that tile the data exactly, and the file size."""
    length = header_length(raw, path, file_size)
    if len(raw) < 8 + length:
        raise TornSnapshotError(path, f"read {len(raw)} bytes of a {8 + length}-byte header (truncated while reading?)")
    listed, data_bytes = bytes(raw[8:8 + length]).count(b'"data_offsets"') if not isinstance(raw, bytes) else \
        raw.count(b'"data_offsets"', 8, 8 + length), file_size - 8 - length
    if listed > data_bytes + MAX_EMPTY_TENSORS:  # each tensor but a few empty ones holds at least a byte
        raise TornSnapshotError(path, f"header lists {listed} tensors for {data_bytes} bytes of data: they cannot all "
                                "hold data (a header built to exhaust memory?); refused before parsing it")
    try:  # decoded straight from the buffer: no bytes copy of the header next to its text
        text = codecs.decode(memoryview(raw)[8 : 8 + length], "utf-8")
    except UnicodeDecodeError as exc:
        raise TornSnapshotError(path, f"header is not UTF-8 ({exc})") from None
    doc = parse_json(text, path, "header", object_pairs_hook=_compact)
    del text
    if not isinstance(doc, _Pairs):
        raise TornSnapshotError(path, "header is not a JSON object")
    data_start, metadata = 8 + length, {}
    for i, (name, info) in enumerate(doc):  # replaced in place, so the parsed form and the entries never coexist
        if name == "__metadata__":
            if not isinstance(info, _Pairs) or not all(type(v) is str for _, v in info):
                raise TornSnapshotError(path, "header __metadata__ must map strings to strings")
            metadata, doc[i] = dict(info), None
        else:
            doc[i] = _tensor_entry(name, info, data_start, file_size, path)
    _SHAPES.clear()
    entries = [e for e in doc if e is not None]
    del doc
    entries.sort(key=attrgetter("name"))  # duplicates side by side: no set of every name next to the entries
    for a, b in zip(entries, entries[1:]):
        if a.name == b.name:
            raise TornSnapshotError(path, f"tensor {a.name[:80]!r} appears twice in the header")
    entries.sort(key=attrgetter("end"))  # two stable sorts on int keys: no (start, end) tuple per tensor
    entries.sort(key=attrgetter("start"))
    cursor = data_start
    for e in entries:
        if e.start != cursor:
            raise TornSnapshotError(path, f"tensor {e.name!r} starts at byte {e.start}, expected {cursor} (hole or "
                                    "overlap)")
        cursor = e.end
    if cursor != file_size:
        why = "truncated" if cursor > file_size else "has trailing bytes"
        raise TornSnapshotError(path, f"file is {file_size} bytes but its header describes {cursor} ({why})")
    return Header(tuple(entries), data_start, file_size, metadata)


def url_of(fs, path: str) -> str:
    return fs.unstrip_protocol(path)


def vanished(fs, path: str, exc: BaseException) -> Exception:
    """A file listed a moment ago that cannot be read now: torn (pruned or replaced) unless storage itself failed."""
    if isinstance(exc, FileNotFoundError):
        return TornSnapshotError(url_of(fs, path), "disappeared after it was listed (pruned or replaced while "
                                 "loading?); load again, or publish the version again if it was pruned")
    return exc if isinstance(exc, OSError) else OSError(f"{url_of(fs, path)}: {type(exc).__name__}: {exc}")


def read_headers(fs, paths: list[str], sizes: list[int]) -> list[Header]:
    """Every file's header, validated; one ranged read each for ordinary headers."""
    if not paths:
        return []
    blobs = fs.cat_ranges(paths, [0] * len(paths), [min(s, HEADER_PROBE_BYTES) for s in sizes], on_error="return")
    headers = []
    for path, size, blob in zip(paths, sizes, blobs):
        url = url_of(fs, path)
        try:
            if isinstance(blob, BaseException):
                raise blob
            need = 8 + header_length(blob, url, size)
            if need > len(blob):
                blob = fs.cat_file(path, start=0, end=need)
        except (OSError, ValueError) as exc:
            if isinstance(exc, TornSnapshotError):
                raise
            raise vanished(fs, path, exc) from None
        headers.append(parse_header(blob, url, size))
    return headers
