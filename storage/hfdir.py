"""Hugging Face checkpoint directories as something to publish: ``model.safetensors``, or the shards
``model.safetensors.index.json`` lists, on any fsspec URL, as lazy tensors under Baton's canonical names and
layout, so that publishing a large model holds about one part in memory, never the model.

Canonical inside Baton: Hugging Face's names with Paddle's ``Linear`` layout ``[in, out]`` (``storage.tp``'s
rules assume it). ``transformers`` writes Linear weights ``[out, in]``; PaddleFormers writes ``[in, out]`` and, in
older releases, names the backbone after the family (``llama.``, ``qwen2.``...) instead of ``model.``. Which
layout a directory uses is read from shapes alone, against the hidden size the embedding gives: q/k/v/gate/up
take ``hidden`` in, o/down give ``hidden`` out. Square projections follow the others; when every one is square,
the safetensors ``format`` metadata decides (``pt`` is ``transformers``). The server's reader (``infer.hf``) uses
the names and files from here and checks every shape against ``config.json`` too.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from .fs import join, listing, open_fs
from .tensorfile import TensorEntry, TensorRef, read_headers
from .tp import LLAMA_TP_RULES, Rules, split_axis

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
PADDLE_PREFIXES = ("llama.", "qwen2.", "qwen3.", "mistral.", "ernie.")  # older PaddleFormers' backbone names
TAKES_HIDDEN = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$")  # [hidden, out] canonical
GIVES_HIDDEN = re.compile(r"\.(o_proj|down_proj)\.weight$")  # [in, hidden] canonical


class FusedTensorError(ValueError):
    """A checkpoint directory holds fused projections (``qkv_proj``, ``gate_up_fused_proj``): Paddle's trainers
    write those, and ``storage.trainer`` reads them."""


def is_hf_dir(names: Mapping[str, int]) -> bool:
    """A directory listing that holds a Hugging Face checkpoint (a config and safetensors weights)."""
    return CONFIG_FILE in names and (WEIGHTS_FILE in names or INDEX_FILE in names)


def is_hf_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    """Whether ``url`` is a Hugging Face checkpoint directory (publish it with ``hf_tensors``)."""
    fs, path = open_fs(url, storage_options)
    return is_hf_dir(listing(fs, path))


def read_json(raw: bytes, url: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{url}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{url}: expected a JSON object")
    return doc


def weight_files(fs, root: str, names: Mapping[str, int], url: str) -> list[str]:
    """The safetensors files of the directory, by name: the shards the index lists, or the single file."""
    if INDEX_FILE in names:
        index = read_json(fs.cat_file(join(root, INDEX_FILE)), f"{url}/{INDEX_FILE}")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{url}/{INDEX_FILE}: missing field 'weight_map'")
        files = sorted(set(weight_map.values()))
        missing = [n for n in files if n not in names]
        if missing:
            raise FileNotFoundError(f"{url}: shards listed in {INDEX_FILE} are missing: {missing[:5]}")
        return files
    if WEIGHTS_FILE in names:
        return [WEIGHTS_FILE]
    raise FileNotFoundError(f"{url}: no {WEIGHTS_FILE} or {INDEX_FILE} (only safetensors weights are read; found "
                            f"{sorted(names)[:10]})")


def canonical(name: str) -> str | None:
    """Baton's name for a checkpoint tensor (a fused one's kept, to be unfused), None for a buffer that is not a
    parameter (``rotary_emb.inv_freq``, which older checkpoints saved: it is computed from the config)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    for prefix in PADDLE_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    return name


def canonical_name(name: str, where: str) -> str | None:
    """``canonical(name)`` of a tensor of a directory served as it is: a fused tensor is refused."""
    if ".qkv_proj." in name or "up_gate_proj" in name or "gate_up_fused_proj" in name:
        raise FusedTensorError(f"{where}: tensor {name!r} is fused: a Paddle trainer's checkpoint, which Baton "
                               "publishes (`baton publish`, storage.trainer) but does not serve from directly")
    return canonical(name)


def scan(url: str, storage_options: dict[str, Any] | None = None):
    """``(fs, {canonical name: (path, entry)}, formats)`` of the directory's weights: every header read and
    checked, no tensor data read."""
    fs, root = open_fs(url, storage_options)
    names = listing(fs, root)
    files = weight_files(fs, root, names, url)
    headers = read_headers(fs, [join(root, n) for n in files], [names[n] for n in files])
    tensors: dict[str, tuple[str, TensorEntry]] = {}
    for file, header in zip(files, headers):
        for e in header.entries:
            canonical = canonical_name(e.name, f"{url}/{file}")
            if canonical is None:
                continue
            if canonical in tensors:
                raise ValueError(f"{url}: tensor {canonical!r} appears twice (in {tensors[canonical][0]} and {file})")
            tensors[canonical] = (join(root, file), e)
    return fs, tensors, {h.metadata.get("format") for h in headers}


def read_tensor(fs, path: str, e: TensorEntry, transpose: bool) -> np.ndarray:
    """One tensor's values (bfloat16 as its 16-bit pattern), ``[in, out]`` when ``transpose``."""
    arr = e.array(fs.cat_file(path, start=e.start, end=e.end), 0)
    return np.ascontiguousarray(arr.T) if transpose else arr


def stored_out_in(tensors: Mapping[str, tuple[str, TensorEntry]], formats: set, url: str) -> set[str]:
    """The Linear weights stored ``[out, in]``, told from shapes (see the module's docstring)."""
    embed = tensors.get("model.embed_tokens.weight")
    if embed is None or len(embed[1].shape) != 2:
        raise ValueError(f"{url}: no 2-D model.embed_tokens.weight, so the hidden size (and the layout) is unknown")
    hidden = embed[1].shape[1]
    votes: dict[str, bool] = {}  # name -> stored [out, in]; absent while undecided (square)
    projections = []
    for name, (_, e) in tensors.items():
        takes, gives = TAKES_HIDDEN.search(name), GIVES_HIDDEN.search(name)
        if not (takes or gives) or len(e.shape) != 2:
            continue
        projections.append(name)
        first, second = (e.shape[0] == hidden), (e.shape[1] == hidden)
        if first != second:  # not square: the shape says which side is hidden
            votes[name] = first if gives else second
    if len(set(votes.values())) > 1:
        mixed = sorted(n for n, v in votes.items() if v)[:2], sorted(n for n, v in votes.items() if not v)[:2]
        raise ValueError(f"{url}: projection weights mix layouts: {mixed[0]} are [out, in], {mixed[1]} [in, out]")
    out_in = next(iter(votes.values())) if votes else formats == {"pt"}
    flipped = set(projections) if out_in else set()
    head = tensors.get("lm_head.weight")
    if head is not None and len(head[1].shape) == 2:  # [vocab, hidden] in both writers' files
        if head[1].shape[1] == hidden and (head[1].shape[0] != hidden or out_in):
            flipped.add("lm_head.weight")
    return flipped


def hf_tensors(url: str, *, rank: int = 0, tp_size: int = 1, rules: Rules = LLAMA_TP_RULES,
               storage_options: dict[str, Any] | None = None) -> dict[str, TensorRef]:
    """Rank ``rank``'s shard (of ``tp_size``) of the checkpoint at ``url``, canonical, as ``TensorRef`` s that
    ``storage.publish`` reads one at a time as it writes each part."""
    fs, tensors, formats = scan(url, storage_options)
    flipped = stored_out_in(tensors, formats, url)
    _, root = open_fs(url, storage_options)
    if fs.exists(join(root, CONFIG_FILE)) and read_json(fs.cat_file(join(root, CONFIG_FILE)), url).get(
            "tie_word_embeddings") is True:
        tensors.pop("lm_head.weight", None)  # some writers save a tied head too; it is the embedding itself
    out: dict[str, TensorRef] = {}
    for name, (path, e) in tensors.items():
        transpose = name in flipped
        shape = tuple(reversed(e.shape)) if transpose else tuple(e.shape)
        axis = split_axis(name, rules) if tp_size > 1 else None
        index: tuple = ()
        if axis is not None:
            if shape[axis] % tp_size:
                raise ValueError(f"{url}: {name} {list(shape)}: axis {axis} does not divide into {tp_size} ranks")
            step = shape[axis] // tp_size
            index = (slice(None),) * axis + (slice(rank * step, (rank + 1) * step),)
            shape = shape[:axis] + (step,) + shape[axis + 1:]
        out[name] = TensorRef(e.dtype, shape, _reader(fs, path, e, transpose, index))
    return out


def _reader(fs, path: str, e: TensorEntry, transpose: bool, index: tuple):
    def read() -> np.ndarray:
        arr = read_tensor(fs, path, e, transpose)
        return np.ascontiguousarray(arr[index]) if index else arr
    return read
