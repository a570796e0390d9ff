"""A committed version as whole tensors: every rank's parts found and checked against their manifests, then each
tensor of the full (unsharded) model read back, a delta version's through its chain. What every exporter shares
(``storage.hfexport`` for SGLang, ``storage.fastdeploy``), with the one scratch buffer they rewrite tensors in.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .deltaload import RankReader, resolve_chain
from .resolve import Source, checked_parts, version_ranks
from .tp import LLAMA_TP_RULES, Rules, split_axis


class WholeTensors:
    """Reads a tensor of the full (unsharded) model from a version's ranks. One rank: each part is read whole
    and checked against its manifest before use. Several: every part is checked at the first read (one pass),
    then each tensor's slices are read by range and joined along its tensor-parallel axis. Names, dtypes and
    shapes come from the headers alone."""

    def __init__(self, sources: list[Source], rules: Rules = LLAMA_TP_RULES):
        self.sources, self.rules = sources, rules
        self.where = [{e.name: (path, e) for path, h in zip(s.files, s.headers) for e in h.entries} for s in sources]
        self.blob: tuple[int, bytes] | None = None
        self.verified = len(sources) == 1

    def index(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype code, whole shape) of every tensor of the version."""
        return {name: (e.dtype, self.shape(name)) for name, (_, e) in self.where[0].items()}

    def shape(self, name: str) -> tuple[int, ...]:
        """The whole tensor's shape: the ranks' slices joined along its tensor-parallel axis."""
        shapes = [where[name][1].shape for where in self.where]
        axis = split_axis(name, self.rules) if len(shapes) > 1 else None
        if axis is None:
            return tuple(shapes[0])
        return tuple(sum(s[axis] for s in shapes) if d == axis else n for d, n in enumerate(shapes[0]))

    def tensor(self, part: int, name: str) -> np.ndarray:
        first = self.sources[0]
        if len(self.sources) == 1:
            if self.blob is None or self.blob[0] != part:
                self.blob = (part, first.read(part))
            _, e = self.where[0][name]
            return e.array(self.blob[1])
        if not self.verified:
            for s in self.sources:
                s.verify(prefetch=4)
            self.verified = True
        slices = []
        for s, where in zip(self.sources, self.where):
            path, e = where[name]
            slices.append(e.array(s.fs.cat_file(path, start=e.start, end=e.end), 0))
        axis = split_axis(name, self.rules)
        return slices[0] if axis is None else np.concatenate(slices, axis=axis)


class ChainTensors(WholeTensors):
    """A delta version's whole tensors: each rank's read through its chain (``storage.deltaload.RankReader``), so an
    engine that loads only full files gets them materialised, bit for bit, one tensor at a time."""

    def __init__(self, readers: list[RankReader], rules: Rules = LLAMA_TP_RULES):
        super().__init__([r.chain[0] for r in readers], rules)  # the full version's layout: the same tensors
        self.readers = readers

    def tensor(self, part: int, name: str) -> np.ndarray:
        slices = [r.tensor(name) for r in self.readers]
        axis = split_axis(name, self.rules) if len(slices) > 1 else None
        return slices[0] if axis is None else np.concatenate(slices, axis=axis)


def open_version(snapshot_root: str, version: str, storage_options: dict[str, Any] | None = None,
                 rules: Rules = LLAMA_TP_RULES) -> WholeTensors:
    """The whole tensors of a version Baton published (every rank's parts and manifest found and checked for
    structure; no tensor data read yet); a delta's through its chain."""
    ranks = version_ranks(snapshot_root, version, storage_options)
    sources = [checked_parts(snapshot_root, version, r, storage_options) for r in range(ranks)]
    if any(s.is_delta for s in sources):
        return ChainTensors([RankReader(resolve_chain(snapshot_root, version, r, strict=True,
                                                      storage_options=storage_options, first=s))
                             for r, s in enumerate(sources)], rules)
    return WholeTensors(sources, rules)


def transpose(a: np.ndarray, out: np.ndarray | None = None, block: int = 256) -> np.ndarray:
    """``a.T``, contiguous (in ``out`` when given), copied in cache-sized blocks, which keeps both the rows read and
    the rows written in cache (numpy's copy of the transposed view strides through memory)."""
    out = np.empty(a.shape[::-1], a.dtype) if out is None else out
    for i in range(0, a.shape[0], block):
        for j in range(0, a.shape[1], block):
            out[j:j + block, i:i + block] = a[i:i + block, j:j + block].T
    return out


class Scratch:
    """One buffer reused for every tensor an export rewrites (joined or transposed): memory already touched takes a
    copy, a fresh array per tensor costs its page faults too."""

    def __init__(self):
        self.buf = np.empty(0, np.uint8)

    def _take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if self.buf.nbytes < nbytes:
            self.buf = np.empty(nbytes, np.uint8)
        return self.buf[:nbytes].view(dtype).reshape(shape)

    def join(self, blocks: list[np.ndarray]) -> np.ndarray:
        """The concatenation of ``blocks`` along their last axis (the block itself when it is one, contiguous)."""
        if len(blocks) == 1 and blocks[0].flags.c_contiguous:
            return blocks[0]
        shape = (*blocks[0].shape[:-1], sum(b.shape[-1] for b in blocks))
        return np.concatenate(blocks, axis=-1, out=self._take(shape, blocks[0].dtype))

    def transpose(self, a: np.ndarray) -> np.ndarray:
        return transpose(a, self._take(a.shape[::-1], a.dtype))
