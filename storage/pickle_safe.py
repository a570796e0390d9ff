"""Read a classic ``paddle.save`` pickle without letting it run code.

Pickle executes whatever callable the stream names. ``paddle.save`` of a state dict only ever needs numpy's
array reconstruction, so everything else is refused before it is looked up, let alone called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

import numpy as np

from .errors import UnsafeCheckpointError

_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("builtins", "tuple"),  # paddle.save reduces a bare tensor to tuple((name, array))
    ("_codecs", "encode"),  # how protocol 2 spells bytes
}
PADDLE_NAME_TABLE = "StructuredToParameterName@@"


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafeCheckpointError(
                f"{self.path}: refused to load — the pickle asks for {module}.{name}, which could run code. "
                "Only tensors and plain containers are accepted; nothing was executed. "
                "Re-save trusted weights as safetensors (`baton publish`)")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.path}: persistent ids are not part of a paddle.save state dict")


def load_state_pickle(data: bytes | BinaryIO, path: str) -> dict[str, np.ndarray]:
    """A flat ``name -> ndarray`` dict from pickle bytes or an open file (read as it goes, so the whole file is
    never in memory next to the arrays), or ``UnsafeCheckpointError``."""
    try:
        obj = _TensorUnpickler(io.BytesIO(data) if isinstance(data, bytes) else data, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # malformed pickles raise anything from EOFError to struct.error
        raise UnsafeCheckpointError(f"{path}: not a readable paddle.save pickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise UnsafeCheckpointError(f"{path}: expected a state dict, found a {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if key == PADDLE_NAME_TABLE:
            continue
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], np.ndarray):
            value = value[1]
        if not isinstance(key, str) or not isinstance(value, np.ndarray) or value.dtype.hasobject:
            raise UnsafeCheckpointError(
                f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; only flat state dicts are accepted")
        out[key] = value
    return out
