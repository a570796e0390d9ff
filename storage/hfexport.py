"""The Hugging Face directory SGLang loads: ``{export_root}/{version}/`` with safetensors shards, their index,
``config.json`` and ``baton.json``, written beside and renamed into place whole. SGLang checks no byte, so every
part is checked on the way (``storage.whole``). Baton's parts hold Paddle's Linear layout ``[in, out]``; SGLang's
loaders expect ``transformers``' ``[out, in]``, so those tensors are transposed as they are written: linking the
parts as they are would load every projection transposed (an error for most, silently wrong for the square ones).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import layout
from .fs import is_local, join, open_fs, storage_calls
from .tensorfile import encode_header, itemsize
from .tp import LLAMA_TP_RULES, Rules
from .whole import Scratch, WholeTensors, open_version

EXPORT_RECORD = "baton.json"  # in an exported Hugging Face directory: the version it holds, written last


def transposed_in_hf(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a canonical tensor is stored transposed in ``transformers``' layout: every 2-D weight but the
    embedding (Linear weights and the LM head are ``[in, out]`` in Baton, ``[out, in]`` there)."""
    return len(shape) == 2 and name.endswith(".weight") and "embed_tokens" not in name


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
            {"version": version, "snapshot_root": snapshot_root, "ranks": len(reader.sources),
             "exported_at": time.time()},
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
