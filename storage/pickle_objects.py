"""What the restricted unpickler (``pickle_safe``) builds in place of what a pickle names, and the lazy record of
an array whose bytes were left in the file.

Nothing here is a real global, dtype or array from the file: a recognised global is a name to dispatch on, a
dtype a type code resolved through an allow-list when an array uses it, an array empty until its BUILD brings
checked shape, dtype and bytes. ``object_kind`` describes any of them, or any value on the unpickler's stack, by
type alone, so that a refusal's message can never recurse or run long.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import numpy as np

from .errors import UnsafeCheckpointError


class GlobalRef:
    """A recognised global: a name to dispatch on, never the real callable."""

    __slots__ = ("kind", "name")

    def __init__(self, kind: str, name: str):
        self.kind, self.name = kind, name


class DtypeRef:
    """``numpy.dtype(code)`` as pickled; resolved through the allow-list when an array uses it."""

    __slots__ = ("code", "order")

    def __init__(self, code: str):
        self.code, self.order = code, None  # order comes with BUILD


class ArrayRef:
    """``_reconstruct(ndarray, ...)``: empty until its BUILD brings shape, dtype and bytes."""

    __slots__ = ("array",)

    def __init__(self):
        self.array: np.ndarray | Stored | None = None


class FileSpan:
    """Bytes of the file left where they are (``lazy``): where they start and how many."""

    __slots__ = ("offset", "n")

    def __init__(self, offset: int, n: int):
        self.offset, self.n = offset, n


class Stored:
    """An array whose bytes were left in the file (``load_state_pickle(..., lazy=True)``): when it is needed,
    read ``nbytes`` bytes at ``offset`` of the same file and pass them to ``array``."""

    __slots__ = ("shape", "dtype", "fortran", "offset", "nbytes")

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, fortran: bool, offset: int, nbytes: int):
        self.shape, self.dtype, self.fortran, self.offset, self.nbytes = shape, dtype, fortran, offset, nbytes

    def array(self, raw: bytes | bytearray | memoryview) -> np.ndarray:
        """The array over ``raw``, this array's bytes (``nbytes`` of them, read from ``offset``)."""
        if len(raw) != self.nbytes:
            raise UnsafeCheckpointError(f"expected {self.nbytes} bytes at offset {self.offset}, read {len(raw)} "
                                        "(did the file change since it was indexed?)")
        flat = np.frombuffer(raw, self.dtype, math.prod(self.shape))
        return flat.reshape(self.shape[::-1]).T if self.fortran else flat.reshape(self.shape)


def object_kind(obj: Any) -> str:
    """What an object is, for messages: by type only, so describing it can never recurse or run long."""
    if isinstance(obj, GlobalRef):
        return f"reference to {obj.name}"
    if isinstance(obj, DtypeRef):
        return "numpy dtype"
    if isinstance(obj, ArrayRef):
        return "ndarray" if obj.array is not None else "ndarray without data"
    if isinstance(obj, (bytearray, memoryview, FileSpan)):
        return "bytes"
    return type(obj).__name__


def dtype_label(code: str, order: str | None) -> str:
    """A pickled dtype for a message: its byte order and code (at most 24 characters), and numpy's name for it
    when the code is a plain one."""
    shown = repr((order if order in ("<", ">", "|", "=") else "") + code[:24])
    if re.fullmatch(r"[A-Za-z?]\d{0,2}", code):  # a plain type code: numpy can name it cheaply
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                shown += f" ({np.dtype(code).name}{', big-endian' if order == '>' else ''})"
        except Exception:  # not a code numpy knows either
            pass
    return shown
