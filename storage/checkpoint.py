"""Reading a trainer's checkpoint (the input of publishing): safetensors, or a ``paddle.save`` pickle read by
Baton's own restricted interpreter, never by ``pickle``."""

from __future__ import annotations

from typing import Any

import numpy as np

from .apply import apply_source
from .fs import listing, open_fs
from .layout import Level
from .pickle_safe import load_state_pickle
from .resolve import Source, probe_file
from .tensorfile import paddle_eager


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
    src = probe_file(fs, root, names, name, Level.FULL)
    return apply_source(src, None, verify="none", label=f"read {name}")[0]


def _adopt(arr: np.ndarray, code: str) -> Any:
    """A Paddle tensor over the unpickled array's own memory (no copy); bfloat16 arrives as uint16 bits."""
    paddle = paddle_eager()

    arr = np.ascontiguousarray(arr)
    if code == "BF16":  # Paddle views int16 (not uint16) as bfloat16
        arr = arr.view(np.int16)
    t = paddle.utils.dlpack.from_dlpack(arr) if arr.size else paddle.to_tensor(arr)
    return t.view(paddle.bfloat16) if code == "BF16" else t
