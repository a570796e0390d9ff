"""Read a classic ``paddle.save`` pickle with Baton's own interpreter, never with ``pickle``.

Why not ``pickle.Unpickler`` with an allow-listed ``find_class``: CPython's C unpickler is unsafe on hostile
bytes even when the only callables it may reach are numpy's. A dict key nested a million tuples deep crashes
the process while it is hashed; a key made of 64 levels of shared tuples (each level a pair of the last, from
the memo) hashes for 2**64 steps; one ``LONG_BINPUT 2**25`` grows its array-shaped memo by half a GiB; a
pickled ``numpy.dtype('O')`` whose state zeroes the flags yields an array of raw pointers that
``dtype.hasobject`` calls safe; and unsupported dtypes such as complex64 would get through, to fail later and
far from the file.

So this module interprets only the opcodes ``paddle.save`` writes at protocols 2 to 4, calls nothing the file
names, and keeps every cost proportional to the file:

- every length is checked against the bytes left in the file before anything is read or allocated;
- memo indices are bounded by the entries actually made: a PUT may not skip ahead, a GET must find one;
- nesting depth is computed as containers are built and capped at ``MAX_DEPTH``; nothing recurses, not even
  the description of a refusal (objects are described by type, never ``repr``-ed);
- only ``str`` is ever hashed: a dict key of any other type is refused before it is inserted;
- the few globals a state dict needs (numpy's array, dtype and scalar reconstruction, OrderedDict, tuple,
  bytes, ``_codecs.encode``) are recognised by name and rebuilt structurally; any other is refused;
- dtypes are rebuilt from their type code through an allow-list of the safetensors dtypes
  (``tensorfile.DTYPE_CODES``) and little-endian byte order; the pickled flags are never looked at;
- shape × itemsize must equal the data's length, and each array is built over the bytes read for it (no
  second copy), so loading takes about one file's size of memory. Arrays read from ``bytes`` are read-only
  views of those bytes; arrays read from a file are writable.

Worst case for a hostile file: one opcode per ``BYTES_PER_OP`` bytes of file (at least ``MIN_OPS``, at most
``MAX_OPS``), each leaving at most ~70 bytes of Python objects (about 4x the file, or 10 MiB for a small one)
and a few microseconds of work. Anything refused raises
``UnsafeCheckpointError`` naming the file and what to do; nothing in it was run.

This module is the opcode interpreter and its limits; ``pickle_input`` reads the bytes within those checks, and
``pickle_objects`` holds what the interpreter builds in place of globals, dtypes and arrays, and ``Stored``.
"""

from __future__ import annotations

import math
import struct
import sys
from pickletools import code2op
from typing import Any, BinaryIO, NoReturn

import numpy as np

from .errors import UnsafeCheckpointError
from .pickle_input import PickleInput
from .pickle_objects import ArrayRef, DtypeRef, FileSpan, GlobalRef, Stored, dtype_label, object_kind
from .tensorfile import DTYPE_CODES

__all__ = ["LAZY_BYTES", "Stored", "load_state_pickle"]

PADDLE_NAME_TABLE = "StructuredToParameterName@@"
MAX_DEPTH = 32  # containers inside containers; a paddle.save state dict needs 4
MAX_OPS = 1 << 23  # ~30 per tensor: room for 250k tensors
MIN_OPS = 1 << 17  # any file may use this many: ~4k tensors
BYTES_PER_OP = 16  # beyond that, a real state dict holds far more bytes per opcode (names and tensor data)
MAX_CONTAINERS = 1 << 20  # tuples, lists and dicts made: ~5 per tensor
MAX_NDIM = 32
LAZY_BYTES = 1 << 12  # with lazy=True, bytes values this long or longer are left in the file
_ADVICE = ("Only flat state dicts of tensors are read from pickles, and nothing in the file was run; "
           "re-save trusted weights as safetensors (`baton publish`)")

_BY_TYPESTR = {dt.str[1:]: dt.newbyteorder("<") for dt, _ in DTYPE_CODES.values()}  # "f4" -> little-endian float32, ...
_LITTLE = {"<", "|"} | ({"="} if sys.byteorder == "little" else set())
_GLOBALS = {  # (module, name) -> what it rebuilds; nothing is imported or called
    ("numpy", "ndarray"): "ndarray", ("numpy", "dtype"): "dtype", ("collections", "OrderedDict"): "OrderedDict",
    ("_codecs", "encode"): "encode",  # protocol 2 spells bytes as _codecs.encode(str, "latin1")
    **{(module, name): name.strip("_") for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("_reconstruct", "scalar")},
    **{(module, name): name for module in ("builtins", "__builtin__") for name in ("tuple", "bytes")},
}


class _Loader:
    """A stack machine for the opcodes in ``_OPS``; ``run`` returns the one object the pickle describes."""

    def __init__(self, data: bytes | BinaryIO, path: str, size: int | None, lazy: bool = False):
        self.path = path
        self.inp = PickleInput(data, size, self.fail)
        self.lazy = lazy and self.inp.file is not None
        self.stack: list[Any] = []
        self.marks: list[int] = []  # stack lengths at each open MARK
        self.memo: list[Any] = []
        self.depth: dict[int, int] = {}  # id -> nesting depth of each container made; negative once sealed
        self.containers = 0
        self.op_at = 0
        self.encoded = 0  # bytes made by _codecs.encode: at most the file's size (the memo could repeat one)
        self.array_bytes = 0  # bytes behind the arrays built: likewise

    def error(self, why: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(f"{self.path}: refused to load: {why}. {_ADVICE}")

    def fail(self, why: str) -> NoReturn:
        raise self.error(why)

    def run(self) -> Any:
        inp = self.inp
        limit = min(MAX_OPS, max(MIN_OPS, inp.size // BYTES_PER_OP))
        for _ in range(limit):
            self.op_at = inp.base + inp.at  # where this opcode starts, for messages
            code = inp.byte()
            handler = _OPS.get(code)
            if handler is None:
                name = code2op[chr(code)].name if chr(code) in code2op else f"byte {code:#04x}"
                self.fail(f"opcode {name} at offset {self.op_at} is not one paddle.save writes")
            if handler(self):
                return self.stack.pop()
        self.fail(f"more than {limit} opcodes for {inp.size} bytes (a real state dict has far fewer)")

    # -- the stack
    def floor(self) -> int:
        return self.marks[-1] if self.marks else 0

    def pop(self, n: int = 1) -> list[Any]:
        if len(self.stack) - n < self.floor():
            self.fail(f"an opcode at offset {self.op_at} takes more values than the stack holds")
        items = self.stack[len(self.stack) - n:]
        del self.stack[len(self.stack) - n:]
        return items

    def top(self) -> Any:
        if len(self.stack) <= self.floor():
            self.fail(f"an opcode at offset {self.op_at} needs a value and the stack has none")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            self.fail(f"an opcode at offset {self.op_at} closes a MARK that was never opened")
        k = self.marks.pop()
        items = self.stack[k:]
        del self.stack[k:]
        return items

    # -- containers: depth tracked as they are built, lists and dicts frozen once inside another container
    def new(self, obj: Any, depth: int) -> Any:
        self.containers += 1
        if self.containers > MAX_CONTAINERS:
            self.fail(f"more than {MAX_CONTAINERS} tuples, lists and dicts")
        if depth > MAX_DEPTH:
            self.fail(f"containers are nested more than {MAX_DEPTH} deep")
        self.depth[id(obj)] = depth
        return obj

    def inner(self, obj: Any) -> int:
        """The depth ``obj`` brings into a container; a list or dict put in one may no longer change."""
        t = type(obj)
        if t is tuple:
            return self.depth[id(obj)]
        if t is list or t is dict:
            d = self.depth[id(obj)]
            self.depth[id(obj)] = -abs(d)
            return abs(d)
        return 0

    def tuple_of(self, items: list[Any]) -> tuple:
        return self.new(tuple(items), 1 + max(map(self.inner, items), default=0))

    def grow(self, target: Any, kind: type, values: list[Any]) -> None:
        """Check that ``values`` may go into ``target`` (a list or dict still being built)."""
        if type(target) is not kind:
            self.fail(f"an opcode at offset {self.op_at} adds items to a {object_kind(target)}")
        d = 1 + max(map(self.inner, values), default=0)
        old = self.depth[id(target)]  # read after inner(): a container put inside itself is sealed by now
        if old < 0:
            self.fail(f"a {kind.__name__} is changed after it was put inside another container")
        if d > MAX_DEPTH:
            self.fail(f"containers are nested more than {MAX_DEPTH} deep")
        self.depth[id(target)] = max(old, d)

    def appends(self, items: list[Any], target: Any = None) -> None:
        """APPEND(S): ``items`` (already popped) go into ``target``, by default the list under them."""
        target = self.top() if target is None else target
        self.grow(target, list, items)
        target.extend(items)

    def setitems(self, items: list[Any], target: Any = None) -> None:
        """SETITEM(S): key, value, ... (already popped) go into ``target``, by default the dict under them."""
        target = self.top() if target is None else target
        if len(items) % 2:
            self.fail(f"SETITEMS at offset {self.op_at} has a key without a value")
        for key in items[0::2]:
            if type(key) is not str:  # checked before anything is hashed
                self.fail(f"a dict key is a {object_kind(key)}; only str keys are read")
        self.grow(target, dict, items[1::2])
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    # -- recognised globals
    def global_(self, module: Any, name: Any) -> GlobalRef:
        if type(module) is not str or type(name) is not str:
            self.fail(f"a global is named by a {object_kind(module)} and a {object_kind(name)}")
        kind = _GLOBALS.get((module, name))
        if kind is None:
            self.fail(f"the pickle asks for {module[:100]}.{name[:100]}, which could run code")
        return GlobalRef(kind, f"{module}.{name}")

    def call(self, fn: GlobalRef, args: tuple) -> Any:
        kind, n = fn.kind, len(args)
        if kind == "reconstruct" and n == 3 and isinstance(args[0], GlobalRef) and args[0].kind == "ndarray":
            return ArrayRef()
        if kind == "dtype" and 1 <= n <= 3 and type(args[0]) is str:
            return DtypeRef(args[0])
        if kind == "scalar" and n == 2 and isinstance(args[1], (bytes, bytearray, memoryview)):
            dtype = self.dtype(args[0])
            if len(args[1]) != dtype.itemsize:
                self.fail(f"a {dtype} scalar has {len(args[1])} bytes")
            self.count_array(dtype.itemsize)
            return np.frombuffer(args[1], dtype, 1).reshape(())
        if kind == "OrderedDict" and n == 0:
            return self.new({}, 1)
        if kind == "tuple" and n == 1 and type(args[0]) is tuple:  # tuple(t) is t: nothing copied
            return args[0]
        if kind == "bytes" and n == 0:
            return b""
        if kind == "encode" and n == 2 and type(args[0]) is str and args[1:] == ("latin1",):  # protocol 2's bytes
            self.encoded += len(args[0])
            if self.encoded > self.inp.size:
                self.fail("it encodes more bytes than the file holds")
            try:
                return bytearray(args[0], "latin1")
            except UnicodeEncodeError:
                self.fail("latin1-encoded bytes hold a character above 255")
        self.fail(f"{fn.name} is called with {n} arguments it does not take in a paddle.save pickle")

    def dtype(self, d: Any) -> np.dtype:
        if not isinstance(d, DtypeRef):
            self.fail(f"an array's dtype is a {object_kind(d)}")
        dtype, order = _BY_TYPESTR.get(d.code), d.order or "="
        if dtype is None or order not in _LITTLE or (order == "|" and dtype.itemsize > 1):
            supported = ", ".join(sorted({dt.name for dt in _BY_TYPESTR.values()}))
            self.fail(f"tensor dtype {dtype_label(d.code, d.order)} is not supported (supported: {supported}, "
                      f"little-endian)")
        return dtype

    def count_array(self, nbytes: int) -> None:
        self.array_bytes += nbytes
        if self.array_bytes > self.inp.size:
            self.fail("its arrays would hold more bytes than the file")

    def array(self, state: Any) -> np.ndarray | Stored:
        if type(state) is not tuple or len(state) not in (4, 5) or (len(state) == 5 and type(state[0]) is not int):
            self.fail(f"an array's state is a {object_kind(state)}, not numpy's (version, shape, dtype, fortran, data)")
        shape, dtype, fortran, raw = state[-4:]
        if type(shape) is not tuple or len(shape) > MAX_NDIM or any(
                type(n) is not int or not 0 <= n <= self.inp.size for n in shape) or math.prod(
                n or 1 for n in shape) > self.inp.size:  # even an empty array's other sizes must fit the file
            self.fail(f"an array's shape is not up to {MAX_NDIM} sizes that fit in the file")
        dtype = self.dtype(dtype)
        if type(fortran) is not bool:
            self.fail(f"an array's order flag is a {object_kind(fortran)}")
        if not isinstance(raw, (bytes, bytearray, memoryview, FileSpan)):
            self.fail(f"an array's data is a {object_kind(raw)}, not bytes")
        count, n = math.prod(shape), raw.n if isinstance(raw, FileSpan) else len(raw)
        if count * dtype.itemsize != n:
            self.fail(f"an array of shape {shape} and dtype {dtype} needs {count * dtype.itemsize} bytes, "
                      f"its data has {n}")
        self.count_array(n)
        if isinstance(raw, FileSpan):
            return Stored(shape, dtype, fortran, raw.offset, raw.n)
        if count == 0:
            return np.empty(shape, dtype)
        flat = np.frombuffer(raw, dtype, count)
        return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)

    # -- opcode handlers: each reads its arguments and returns True only for STOP
    def op_proto(self):
        version = self.inp.take(1)[0]
        if not 2 <= version <= 5:
            self.fail(f"pickle protocol {version} is not one paddle.save writes")

    def op_frame(self):
        self.inp.need(int.from_bytes(self.inp.take(8), "little"), "a frame")

    def op_stop(self):
        if self.marks or len(self.stack) != 1:
            self.fail(f"the pickle ends with {len(self.stack)} values and {len(self.marks)} open MARKs, not one value")
        return True

    def op_list(self):
        items, lst = self.pop_mark(), self.new([], 1)
        self.appends(items, lst)
        self.stack.append(lst)

    def op_dict(self):
        items, d = self.pop_mark(), self.new({}, 1)
        self.setitems(items, d)
        self.stack.append(d)

    def op_mark(self):
        self.marks.append(len(self.stack))

    def push_int(self, n: int, signed: bool = False):
        self.stack.append(int.from_bytes(self.inp.take(n), "little", signed=signed))

    def op_long1(self):
        self.push_int(self.inp.take(1)[0], signed=True)

    def op_binfloat(self):
        self.stack.append(struct.unpack(">d", self.inp.take(8))[0])

    def push_str(self, width: int):
        n = int.from_bytes(self.inp.take(width), "little")
        try:
            self.stack.append(str(self.inp.take(n, "a string"), "utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            self.fail(f"a string at offset {self.op_at} is not UTF-8")

    def push_bytes(self, width: int):
        n = int.from_bytes(self.inp.take(width), "little")
        if self.lazy and n >= LAZY_BYTES:
            self.stack.append(self.inp.skip(n, "a bytes value"))
        else:
            self.stack.append(self.inp.payload(n, "a bytes value"))

    def put(self, index: int):
        """The pickler numbers memo entries 0, 1, 2, ...: an index may replace an entry or add the next one,
        never skip ahead (so the memo is a list, as long as the PUTs that made it)."""
        if index < len(self.memo):
            self.memo[index] = self.top()
        elif index == len(self.memo):
            self.memo.append(self.top())
        else:
            self.fail(f"memo index {index} at offset {self.op_at} skips past the {len(self.memo)} entries stored")

    def get(self, index: int):
        if index >= len(self.memo):
            self.fail(f"memo entry {index} is read at offset {self.op_at} but was never stored")
        self.stack.append(self.memo[index])

    def op_global(self):
        module, name = self.line(), self.line()
        self.stack.append(self.global_(module, name))

    def line(self) -> str:
        out = bytearray()
        while (c := self.inp.take(1)[0]) != 10:
            out.append(c)
            if len(out) > 200:
                self.fail("a GLOBAL names a module or attribute longer than 200 bytes")
        try:
            return out.decode("utf-8")
        except UnicodeDecodeError:
            self.fail("a GLOBAL's name is not UTF-8")

    def op_stack_global(self):
        module, name = self.pop(2)
        self.stack.append(self.global_(module, name))

    def op_reduce(self):
        fn, args = self.pop(2)
        if not isinstance(fn, GlobalRef):
            self.fail(f"the pickle calls a {object_kind(fn)}")
        if type(args) is not tuple:
            self.fail(f"{fn.name} is called with a {object_kind(args)} for arguments")
        self.stack.append(self.call(fn, args))

    def op_build(self):
        state = self.pop()[0]
        target = self.top()
        if isinstance(target, DtypeRef) and target.order is None:
            if type(state) is not tuple or len(state) < 2 or type(state[1]) is not str:
                self.fail(f"a dtype's state is a {object_kind(state)}, not numpy's")
            target.order = state[1]  # the byte order; flags and the rest are never looked at
        elif isinstance(target, ArrayRef) and target.array is None:
            target.array = self.array(state)
        else:
            self.fail(f"BUILD at offset {self.op_at} sets the state of a {object_kind(target)}")


_OPS = {op[0]: handler for op, handler in {
    b"\x80": _Loader.op_proto,
    b"\x95": _Loader.op_frame,
    b".": _Loader.op_stop,
    b"(": _Loader.op_mark,
    b"N": lambda m: m.stack.append(None),
    b"\x88": lambda m: m.stack.append(True),
    b"\x89": lambda m: m.stack.append(False),
    b"K": lambda m: m.push_int(1),
    b"M": lambda m: m.push_int(2),
    b"J": lambda m: m.push_int(4, signed=True),
    b"\x8a": _Loader.op_long1,
    b"G": _Loader.op_binfloat,
    b"\x8c": lambda m: m.push_str(1),
    b"X": lambda m: m.push_str(4),
    b"\x8d": lambda m: m.push_str(8),
    b"C": lambda m: m.push_bytes(1),
    b"B": lambda m: m.push_bytes(4),
    b"\x8e": lambda m: m.push_bytes(8),
    b")": lambda m: m.stack.append(m.new((), 1)),
    b"t": lambda m: m.stack.append(m.tuple_of(m.pop_mark())),
    b"\x85": lambda m: m.stack.append(m.tuple_of(m.pop(1))),
    b"\x86": lambda m: m.stack.append(m.tuple_of(m.pop(2))),
    b"\x87": lambda m: m.stack.append(m.tuple_of(m.pop(3))),
    b"]": lambda m: m.stack.append(m.new([], 1)),
    b"l": _Loader.op_list,
    b"a": lambda m: m.appends(m.pop()),
    b"e": lambda m: m.appends(m.pop_mark()),
    b"}": lambda m: m.stack.append(m.new({}, 1)),
    b"d": _Loader.op_dict,
    b"s": lambda m: m.setitems(m.pop(2)),
    b"u": lambda m: m.setitems(m.pop_mark()),
    b"q": lambda m: m.put(m.inp.take(1)[0]),
    b"r": lambda m: m.put(int.from_bytes(m.inp.take(4), "little")),
    b"\x94": lambda m: m.put(len(m.memo)),
    b"h": lambda m: m.get(m.inp.take(1)[0]),
    b"j": lambda m: m.get(int.from_bytes(m.inp.take(4), "little")),
    b"c": _Loader.op_global,
    b"\x93": _Loader.op_stack_global,
    b"R": _Loader.op_reduce,
    b"b": _Loader.op_build,
}.items()}


def load_state_pickle(data: bytes | BinaryIO, path: str, *, size: int | None = None,
                      lazy: bool = False) -> dict[str, np.ndarray | Stored]:
    """A flat ``name -> ndarray`` dict from a ``paddle.save`` pickle (bytes, or a binary file read from its
    current position, ``size`` bytes or to its end), or ``UnsafeCheckpointError`` naming ``path``. With ``lazy``
    (a seekable file), arrays of ``LAZY_BYTES`` or more are ``Stored``: their bytes are passed over, not read,
    so indexing a checkpoint costs its opcodes, not its size.

    The name table paddle adds is skipped and a bare tensor's ``(name, array)`` is unwrapped to the array.
    """
    loader = _Loader(data, path, size, lazy)
    try:
        obj = loader.run()
    except (UnsafeCheckpointError, OSError, MemoryError):
        raise
    except Exception as exc:  # a gap in the checks above: still refuse rather than let anything through
        raise loader.error(f"the pickle could not be read ({type(exc).__name__} at offset {loader.op_at})") from None
    if type(obj) is not dict:
        loader.fail(f"expected a state dict, found a {object_kind(obj)}")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():  # keys are all str: nothing else got into a dict
        if key == PADDLE_NAME_TABLE:
            continue
        if type(value) is tuple and len(value) == 2 and isinstance(value[1], ArrayRef):
            value = value[1]
        if isinstance(value, ArrayRef) and value.array is not None:
            value = value.array
        if not isinstance(value, (np.ndarray, Stored)):
            loader.fail(f"entry {key[:100]!r} is a {object_kind(value)}, not a tensor")
        out[key] = value
    return out
