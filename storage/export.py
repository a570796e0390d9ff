"""Putting a version where another engine reads it: the pieces every export shares (the version's parts, checked
against its manifest, read back as whole tensors), and the Hugging Face directory SGLang loads. FastDeploy's
layout is ``storage.fastdeploy``. Neither engine checks a byte, so every part is checked on the way.

SGLang loads a Hugging Face directory: ``{export_root}/{version}/`` with safetensors shards, their index,
``config.json`` and ``baton.json``, written beside and renamed into place whole. Baton's parts hold Paddle's
Linear layout ``[in, out]``; SGLang's loaders expect ``transformers``' ``[out, in]``, so those tensors are
transposed as they are written: linking the parts as they are would load every projection transposed (an error
for most, silently wrong for the square ones).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash

from . import layout
from .apply import digest_mismatch, verify_parts
from .chain import RankReader, resolve_chain
from .errors import SnapshotNotFoundError, TornSnapshotError
from .fs import is_local, join, listing, open_fs, read_whole, storage_calls
from .resolve import Source, resolve
from .tensorfile import DTYPES, encode_header, itemsize
from .tp import LLAMA_TP_RULES, Rules, split_axis

EXPORT_RECORD = "baton.json"  # in an exported Hugging Face directory: the version it holds, written last


def version_ranks(snapshot_root: str, version: str, storage_options) -> int:
    """How many ranks ``version`` was published as (its manifests must be ranks 0..n-1)."""
    ranks = sorted({parsed[0] for n in listing(*open_fs(snapshot_root, storage_options))
                    if (parsed := layout.parse_manifest_name(n)) and parsed[1] == version})
    if not ranks:
        raise SnapshotNotFoundError(version, [f"{snapshot_root}: no manifest of {version} (publish it first)"])
    if ranks != list(range(len(ranks))):
        raise TornSnapshotError(snapshot_root, f"{version} has ranks {ranks}, not 0..{len(ranks) - 1}: publish it again")
    return len(ranks)


def checked_parts(snapshot_root: str, version: str, rank: int, storage_options) -> Source:
    src = resolve(snapshot_root, version, rank, strict=True, storage_options=storage_options)
    if src.level != layout.Level.PARTS or not all(src.digests):
        raise TornSnapshotError(src.urls()[0], f"found at level {int(src.level)} ({src.level.label}), without "
                                "checksums: only versions published by Baton (parts and a manifest) are staged for "
                                "another engine; publish it with `baton publish`")
    return src


def write_json(fs, path: str, doc: dict) -> None:
    """Replaces ``path`` whole: written beside, then renamed over it."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(tmp, json.dumps(doc, indent=1, sort_keys=True).encode())
    fs.mv(tmp, path)


def read_record(url: str, name: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The JSON record ``name`` under ``url`` (``flows.fastdeploy.stage_record(...)`` or ``EXPORT_RECORD``), None when absent or
    unreadable (a record half-written by hand is as good as none: the version is then unknown)."""
    fs, root = open_fs(url, storage_options)
    try:
        doc = json.loads(fs.cat_file(join(root, name)))
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def transposed_in_hf(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a canonical tensor is stored transposed in ``transformers``' layout: every 2-D weight but the
    embedding (Linear weights and the LM head are ``[in, out]`` in Baton, ``[out, in]`` there)."""
    return len(shape) == 2 and name.endswith(".weight") and "embed_tokens" not in name


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
                data = read_whole(first.fs, first.files[part])
                got = xxhash.xxh3_128(data).hexdigest()
                if got != first.digests[part]:
                    raise digest_mismatch(first.urls()[part], got, first.digests[part])
                self.blob = (part, data)
            _, e = self.where[0][name]
            return np.frombuffer(self.blob[1], DTYPES[e.dtype][0], e.nbytes // DTYPES[e.dtype][0].itemsize,
                                 e.start).reshape(e.shape)
        if not self.verified:
            for s in self.sources:
                verify_parts(s, prefetch=4)
            self.verified = True
        slices = []
        for s, where in zip(self.sources, self.where):
            path, e = where[name]
            raw = s.fs.cat_file(path, start=e.start, end=e.end)
            slices.append(np.frombuffer(raw, DTYPES[e.dtype][0]).reshape(e.shape))
        axis = split_axis(name, self.rules)
        return slices[0] if axis is None else np.concatenate(slices, axis=axis)


class ChainTensors(WholeTensors):
    """A delta version's whole tensors: each rank's read through its chain (``storage.chain.RankReader``), so an
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
    """``a.T``, contiguous (in ``out`` when given), copied in cache-sized blocks: twice as fast here as numpy's copy
    of the transposed view."""
    out = np.empty(a.shape[::-1], a.dtype) if out is None else out
    for i in range(0, a.shape[0], block):
        for j in range(0, a.shape[1], block):
            out[j:j + block, i:i + block] = a[i:i + block, j:j + block].T
    return out


class Scratch:
    """One buffer reused for every tensor an export rewrites (joined or transposed): writing into memory that is
    already mapped costs a memcpy, a fresh array per tensor costs its page faults too."""

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


def _write_shard(fs, path: str, reader: WholeTensors, part: int, scratch: Scratch) -> dict[str, int]:
    """The tensors of part ``part`` (whole, in ``transformers``' layout) as one safetensors file, written tensor by
    tensor after the header; returns name -> bytes."""
    items = []
    for e in reader.sources[0].headers[part].entries:
        shape = reader.shape(e.name)
        flip = transposed_in_hf(e.name, shape)
        items.append((e.name, e.dtype, shape[::-1] if flip else shape, flip))
    sizes = {name: int(np.prod(shape, dtype=np.int64)) * itemsize(code) for name, code, shape, _ in items}
    with fs.open(path, "wb") as f:
        f.write(encode_header([(n, c, shape, sizes[n]) for n, c, shape, _ in items], {"format": "pt"}))
        for name, _, _, flip in items:
            value = reader.tensor(part, name)
            f.write(memoryview(scratch.transpose(value) if flip else np.ascontiguousarray(value)).cast("B"))
    return sizes


@storage_calls
def export_hf_dir(snapshot_root: str, version: str, export_root: str, config: bytes, *, rules: Rules = LLAMA_TP_RULES,
                  storage_options: dict[str, Any] | None = None, reader: WholeTensors | None = None) -> str:
    """``{export_root}/{version}``, a Hugging Face directory of the whole model (ranks joined) in
    ``transformers``' layout with ``config`` as its ``config.json``, for engines that load those (SGLang's
    ``update_weights_from_disk``). One shard per part of rank 0, written tensor by tensor, so about one part is
    in memory at a time.
    Returns its path; a version already exported there is returned as it is. ``reader``: the version as
    ``open_version`` gave it, when the caller opened it already."""
    layout.check_id(version)
    fs, root = open_fs(export_root)
    final = join(root, version)
    if fs.exists(join(final, EXPORT_RECORD)):
        return final
    json.loads(config)  # a config that is not JSON would only fail later, inside the engine
    reader = reader or open_version(snapshot_root, version, storage_options, rules)
    tmp = join(root, f".{version}.tmp-{uuid.uuid4().hex[:8]}")
    fs.makedirs(tmp)
    try:
        parts = len(reader.sources[0].headers)
        weight_map, total, scratch = {}, 0, Scratch()
        for part in range(parts):
            file = f"model-{part + 1:05d}-of-{parts:05d}.safetensors"
            sizes = _write_shard(fs, join(tmp, file), reader, part, scratch)
            weight_map.update(dict.fromkeys(sizes, file))
            total += sum(sizes.values())
        fs.pipe_file(join(tmp, "model.safetensors.index.json"),
                     json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1).encode())
        fs.pipe_file(join(tmp, "config.json"), config)
        fs.pipe_file(join(tmp, EXPORT_RECORD), json.dumps(
            {"version": version, "snapshot_root": snapshot_root, "ranks": len(reader.sources), "exported_at": time.time()},
            indent=1).encode())
        try:
            if is_local(fs):
                os.rename(tmp, final)  # refuses a non-empty directory there, where a move would nest into it
            else:
                fs.mv(tmp, final, recursive=True)
        except OSError:
            if not fs.exists(join(final, EXPORT_RECORD)):  # unless a concurrent export of it just finished
                raise
        return final
    finally:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)


def prune_exports(export_root: str, keep: Sequence[str]) -> list[str]:
    """Removes the exported versions under ``export_root`` not in ``keep``; returns their names. Only
    directories Baton exported (with ``baton.json``) are touched."""
    fs, root = open_fs(export_root)
    removed = []
    for path in fs.ls(root, detail=False) if fs.exists(root) else []:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name not in keep and not name.startswith(".") and fs.exists(join(path, EXPORT_RECORD)):
            fs.rm(path, recursive=True)
            removed.append(name)
    return sorted(removed)
