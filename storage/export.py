"""Putting a version where another engine reads it: FastDeploy's model directory, or a Hugging Face directory for
SGLang. Neither engine checks a byte, so every part is checked against its manifest on the way.

FastDeploy (``--dynamic-load-weight``, load strategy ``ipc_snapshot``) loads whatever
``{model_dir}/model_state.tp{rank}.{gpu}.part*.pdparams`` hold, sorted by the part number, and keeps no version.
A version is staged there as one set: its parts are hard-linked (or copied) and checked in a directory beside,
the parts of those names it does not overwrite are removed (FastDeploy would load them too), and the new ones
are moved in by renames. ``baton-staged.gpu{ids}.json`` says which version the files are, since FastDeploy cannot:
``swapping`` while the renames run, so a set interrupted half-way is never taken for either version.

SGLang loads a Hugging Face directory: ``{export_root}/{version}/`` with safetensors shards, their index,
``config.json`` and ``baton.json``, written beside and renamed into place whole. Baton's parts hold Paddle's
Linear layout ``[in, out]``; SGLang's loaders expect ``transformers``' ``[out, in]``, so those tensors are
transposed as they are written: linking the parts as they are would load every projection transposed (an error
for most, silently wrong for the square ones).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import xxhash

from . import layout
from .apply import digest_mismatch, verify_parts, xxh3_file
from .errors import IncompatibleTargetError, SnapshotNotFoundError, TornSnapshotError
from .fs import is_local, join, listing, open_fs, storage_calls
from .resolve import Source, resolve
from .tensorfile import DTYPES, encode_header, itemsize
from .tp import LLAMA_TP_RULES, Rules, split_axis

EXPORT_RECORD = "baton.json"  # in an exported Hugging Face directory: the version it holds, written last


def stage_record(gpu_ids: Sequence[int]) -> str:
    """The record of what one FastDeploy server's files in a model directory hold: one per set of GPUs, since
    several servers (on different GPUs) may share a model directory."""
    return f"baton-staged.gpu{'-'.join(str(layout.check_rank(g)) for g in gpu_ids)}.json"


def fastdeploy_glob(rank: int, gpu: int) -> str:
    """The files FastDeploy's first level loads for one worker (its ``{base}.part*.pdparams``)."""
    return f"model_state.tp{layout.check_rank(rank)}.{layout.check_rank(gpu)}.part*.pdparams"


def _ranks(snapshot_root: str, version: str, storage_options) -> int:
    """How many ranks ``version`` was published as (its manifests must be ranks 0..n-1)."""
    ranks = sorted({parsed[0] for n in listing(*open_fs(snapshot_root, storage_options))
                    if (parsed := layout.parse_manifest_name(n)) and parsed[1] == version})
    if not ranks:
        raise SnapshotNotFoundError(version, [f"{snapshot_root}: no manifest of {version} (publish it first)"])
    if ranks != list(range(len(ranks))):
        raise TornSnapshotError(snapshot_root, f"{version} has ranks {ranks}, not 0..{len(ranks) - 1}: publish it again")
    return len(ranks)


def _checked_parts(snapshot_root: str, version: str, rank: int, storage_options) -> Source:
    src = resolve(snapshot_root, version, rank, strict=True, storage_options=storage_options)
    if src.level != layout.Level.PARTS or not all(src.digests):
        raise TornSnapshotError(src.urls()[0], f"found at level {int(src.level)} ({src.level.label}), without "
                                "checksums: only versions published by Baton (parts and a manifest) are staged for "
                                "another engine; publish it with `baton publish`")
    return src


def _put(src: Source, i: int, fs, dest: str) -> None:
    """Part ``i`` of ``src`` at ``dest``, checked: hard-linked when both sides are one local filesystem (no byte
    copied; published parts are never rewritten in place), else copied."""
    path, url, expected = src.files[i], src.urls()[i], src.digests[i]
    if is_local(fs):
        if is_local(src.fs):
            try:
                os.link(path, dest)
            except OSError:  # another filesystem, or links not allowed there
                shutil.copyfile(path, dest)
        else:
            src.fs.get_file(path, dest)
        got = xxh3_file(dest)
    else:
        data = src.fs.cat_file(path)
        got = xxhash.xxh3_128(data).hexdigest()
        if got == expected:
            fs.pipe_file(dest, data)
    if got != expected:
        raise digest_mismatch(url, got, expected)


def _write_json(fs, path: str, doc: dict) -> None:
    """Replaces ``path`` whole: written beside, then renamed over it."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(tmp, json.dumps(doc, indent=1, sort_keys=True).encode())
    fs.mv(tmp, path)


def read_record(url: str, name: str, storage_options: dict[str, Any] | None = None) -> dict | None:
    """The JSON record ``name`` under ``url`` (``stage_record(...)`` or ``EXPORT_RECORD``), None when absent or
    unreadable (a record half-written by hand is as good as none: the version is then unknown)."""
    fs, root = open_fs(url, storage_options)
    try:
        doc = json.loads(fs.cat_file(join(root, name)))
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


@storage_calls
def stage_fastdeploy(snapshot_root: str, version: str, model_dir: str, gpu_ids: Sequence[int], *,
                     storage_options: dict[str, Any] | None = None) -> dict:
    """Stage ``version`` into a FastDeploy model directory: rank ``r`` of the snapshot (published with
    ``serving_tp=len(gpu_ids)``) as ``model_state.tp{r}.{gpu_ids[r]}.part{N}.pdparams``, numbered from 1 as
    FastDeploy's own tests name them. Returns the record written to ``stage_record(gpu_ids)`` (state
    ``staged``). Other files in the directory, other GPUs' parts included, are left alone."""
    layout.check_id(version)
    if not gpu_ids:
        raise ValueError("gpu_ids is empty: give the GPU number of each rank of the FastDeploy server")
    ranks = _ranks(snapshot_root, version, storage_options)
    if ranks != len(gpu_ids):
        raise IncompatibleTargetError(f"{snapshot_root}: {version} was published for {ranks} ranks, the FastDeploy "
                                      f"server has {len(gpu_ids)} (gpu_ids {list(gpu_ids)}): publish it with "
                                      f"serving_tp={len(gpu_ids)}")
    sources = [_checked_parts(snapshot_root, version, rank, storage_options) for rank in range(len(gpu_ids))]
    fs, root = open_fs(model_dir)
    fs.makedirs(root, exist_ok=True)
    record_name = stage_record(gpu_ids)
    mine = f".baton-stage.{record_name}."
    for name in fs.ls(root, detail=False):  # left by a stage of this server that was killed: never loaded
        if name.rstrip("/").rsplit("/", 1)[-1].startswith(mine):
            fs.rm(name, recursive=True)
    stage = join(root, f"{mine}{uuid.uuid4().hex[:8]}")
    fs.makedirs(stage)
    try:
        new = []
        for rank, (gpu, src) in enumerate(zip(gpu_ids, sources)):
            for i in range(len(src.files)):
                new.append(layout.part_name(rank, str(gpu), i + 1))
                _put(src, i, fs, join(stage, new[-1]))
        record = {"version": version, "snapshot_root": snapshot_root, "gpu_ids": list(gpu_ids), "files": new,
                  "bytes": sum(s.bytes for s in sources), "state": "swapping", "staged_at": time.time()}
        _write_json(fs, join(root, record_name), record)
        globs = [fastdeploy_glob(rank, gpu) for rank, gpu in enumerate(gpu_ids)]
        for name in listing(fs, root):
            if name not in new and any(fnmatch.fnmatchcase(name, g) for g in globs):
                fs.rm(join(root, name))
        for name in new:
            fs.mv(join(stage, name), join(root, name))
        record["state"] = "staged"
        _write_json(fs, join(root, record_name), record)
        return record
    finally:
        if fs.exists(stage):
            fs.rm(stage, recursive=True)


def mark_live(model_dir: str, gpu_ids: Sequence[int], version: str) -> None:
    """Records that the FastDeploy server on ``gpu_ids`` over ``model_dir`` loaded the staged ``version``."""
    fs, root = open_fs(model_dir)
    name = stage_record(gpu_ids)
    record = read_record(model_dir, name)
    if not record or record.get("version") != version or record.get("state") not in ("staged", "live"):
        raise TornSnapshotError(join(root, name), f"does not record {version} as staged; stage it again")
    _write_json(fs, join(root, name), record | {"state": "live", "live_at": time.time()})


def transposed_in_hf(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a canonical tensor is stored transposed in ``transformers``' layout: every 2-D weight but the
    embedding (Linear weights and the LM head are ``[in, out]`` in Baton, ``[out, in]`` there)."""
    return len(shape) == 2 and name.endswith(".weight") and "embed_tokens" not in name


class _Ranks:
    """Reads a tensor of the full (unsharded) model from a version's ranks. One rank: each part is read whole
    and checked against its manifest before use. Several: every part is checked first (one read), then each
    tensor's slices are read by range and joined along its tensor-parallel axis."""

    def __init__(self, sources: list[Source], rules: Rules):
        self.sources, self.rules = sources, rules
        self.where = [{e.name: (path, e) for path, h in zip(s.files, s.headers) for e in h.entries} for s in sources]
        self.blob: tuple[int, bytes] | None = None
        if len(sources) > 1:
            for s in sources:
                verify_parts(s, prefetch=4)

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
                data = first.fs.cat_file(first.files[part])
                got = xxhash.xxh3_128(data).hexdigest()
                if got != first.digests[part]:
                    raise digest_mismatch(first.urls()[part], got, first.digests[part])
                self.blob = (part, data)
            _, e = self.where[0][name]
            return np.frombuffer(self.blob[1], DTYPES[e.dtype][0], e.nbytes // DTYPES[e.dtype][0].itemsize,
                                 e.start).reshape(e.shape)
        slices = []
        for s, where in zip(self.sources, self.where):
            path, e = where[name]
            raw = s.fs.cat_file(path, start=e.start, end=e.end)
            slices.append(np.frombuffer(raw, DTYPES[e.dtype][0]).reshape(e.shape))
        axis = split_axis(name, self.rules)
        return slices[0] if axis is None else np.concatenate(slices, axis=axis)


def _transpose(a: np.ndarray, block: int = 256) -> np.ndarray:
    """``a.T``, contiguous, copied in cache-sized blocks: twice as fast here as numpy's copy of the transposed view."""
    out = np.empty(a.shape[::-1], a.dtype)
    for i in range(0, a.shape[0], block):
        for j in range(0, a.shape[1], block):
            out[j:j + block, i:i + block] = a[i:i + block, j:j + block].T
    return out


def _write_shard(fs, path: str, reader: _Ranks, part: int) -> dict[str, int]:
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
            f.write(memoryview(_transpose(value) if flip else np.ascontiguousarray(value)).cast("B"))
    return sizes


@storage_calls
def export_hf_dir(snapshot_root: str, version: str, export_root: str, config: bytes, *, rules: Rules = LLAMA_TP_RULES,
                  storage_options: dict[str, Any] | None = None) -> str:
    """``{export_root}/{version}``, a Hugging Face directory of the whole model (ranks joined) in
    ``transformers``' layout with ``config`` as its ``config.json``, for engines that load those (SGLang's
    ``update_weights_from_disk``). One shard per part of rank 0, written tensor by tensor, so about one part is
    in memory at a time.
    Returns its path; a version already exported there is returned as it is."""
    layout.check_id(version)
    fs, root = open_fs(export_root)
    final = join(root, version)
    if fs.exists(join(final, EXPORT_RECORD)):
        return final
    json.loads(config)  # a config that is not JSON would only fail later, inside the engine
    ranks = _ranks(snapshot_root, version, storage_options)
    reader = _Ranks([_checked_parts(snapshot_root, version, r, storage_options) for r in range(ranks)], rules)
    tmp = join(root, f".{version}.tmp-{uuid.uuid4().hex[:8]}")
    fs.makedirs(tmp)
    try:
        parts = len(reader.sources[0].headers)
        weight_map, total = {}, 0
        for part in range(parts):
            file = f"model-{part + 1:05d}-of-{parts:05d}.safetensors"
            sizes = _write_shard(fs, join(tmp, file), reader, part)
            weight_map.update(dict.fromkeys(sizes, file))
            total += sum(sizes.values())
        fs.pipe_file(join(tmp, "model.safetensors.index.json"),
                     json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1).encode())
        fs.pipe_file(join(tmp, "config.json"), config)
        fs.pipe_file(join(tmp, EXPORT_RECORD), json.dumps(
            {"version": version, "snapshot_root": snapshot_root, "ranks": ranks, "exported_at": time.time()},
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
