"""Tensor-parallel layout: which axis of each tensor is divided among ranks, and the split/merge between a
full state dict and per-rank shards.

It lives in ``storage`` because it is a property of the checkpoint, shared by whoever writes per-rank files
(a trainer, the publish flow when it reshards) and whoever reads them (the server): rank ``r``'s shard is what
``model_state.tp{r}.{id}.*`` holds. Weights are stored ``[in, out]`` as Paddle's ``Linear`` keeps them, so
column-parallel layers split axis 1 and row-parallel layers axis 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .tensorfile import paddle_eager

# (pattern on the tensor name, axis split among ranks or None when every rank holds all of it). First match wins.
Rules = Sequence[tuple[str, int | None]]

# The decoders of Llama, Qwen2, Qwen3, Mistral and ERNIE 4.5 under Hugging Face's names (``infer.model``).
LLAMA_TP_RULES: Rules = (
    (r"(^|\.)embed_tokens\.weight$", 0),  # vocab-parallel [vocab, hidden]
    (r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", 1),  # column-parallel
    (r"(^|\.)(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", 0),  # each rank's bias for its own columns
    (r"(^|\.)(o_proj|down_proj)\.weight$", 0),  # row-parallel
    (r"(^|\.)(o_proj|down_proj)\.bias$", None),  # added once to the summed partial products: replicated
    (r"(^|\.)lm_head\.weight$", 1),  # [hidden, vocab], vocab-parallel logits
    (r"norm\.weight$", None),  # RMSNorm scales are replicated, Qwen3's per-head q_norm/k_norm too
)


def split_axis(name: str, rules: Rules = LLAMA_TP_RULES) -> int | None:
    """The axis ``name`` is divided along, or None for a replicated tensor; unknown names are an error so a new
    layer cannot silently end up replicated (and wrong) on every rank."""
    for pattern, axis in rules:
        if re.search(pattern, name):
            return axis
    raise ValueError(f"no tensor-parallel rule matches {name!r}: add a (pattern, axis) rule for it")


def _split(x: Any, parts: int, axis: int) -> list[Any]:
    if isinstance(x, np.ndarray):
        return [np.ascontiguousarray(p) for p in np.split(x, parts, axis=axis)]
    paddle = paddle_eager()

    return [p.contiguous() for p in paddle.split(x, parts, axis=axis)]


def _concat(xs: list[Any], axis: int) -> Any:
    if isinstance(xs[0], np.ndarray):
        return np.concatenate(xs, axis=axis)
    paddle = paddle_eager()

    return paddle.concat(xs, axis=axis)


def split_state_dict(state: Mapping[str, Any], tp_size: int, rules: Rules = LLAMA_TP_RULES) -> list[dict[str, Any]]:
    """Shards a full state dict (numpy arrays or Paddle tensors) into ``tp_size`` rank state dicts with the same
    names. Every split dimension must divide evenly: the error names each tensor that does not."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be at least 1, got {tp_size}")
    shards: list[dict[str, Any]] = [{} for _ in range(tp_size)]
    uneven = []
    for name, x in state.items():
        axis = split_axis(name, rules)
        if axis is None or tp_size == 1:
            for shard in shards:
                shard[name] = x
        elif x.shape[axis] % tp_size:
            uneven.append(f"{name} {list(x.shape)} axis {axis}")
        else:
            for shard, piece in zip(shards, _split(x, tp_size, axis)):
                shard[name] = piece
    if uneven:
        raise ValueError(f"cannot split into {tp_size} ranks, these dimensions do not divide: " + "; ".join(uneven))
    return shards


def merge_state_dicts(shards: Sequence[Mapping[str, Any]], rules: Rules = LLAMA_TP_RULES) -> dict[str, Any]:
    """The inverse of ``split_state_dict``: concatenates split tensors and checks replicated ones agree."""
    if not shards:
        raise ValueError("merge_state_dicts needs at least one shard")
    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            missing = sorted(set(names) ^ set(shard))[:5]
            raise ValueError(f"rank {rank} holds different tensors than rank 0 (differing: {missing})")
    merged = {}
    for name in names:
        axis = split_axis(name, rules)
        pieces = [shard[name] for shard in shards]
        if axis is None:
            first = np.asarray(pieces[0] if isinstance(pieces[0], np.ndarray) else pieces[0].numpy())
            for rank, p in enumerate(pieces[1:], start=1):
                if not np.array_equal(first, p if isinstance(p, np.ndarray) else p.numpy()):
                    raise ValueError(f"replicated tensor {name!r} differs between rank 0 and rank {rank}")
            merged[name] = pieces[0]
        else:
            merged[name] = pieces[0] if len(pieces) == 1 else _concat(pieces, axis)
    return merged


def reshard(shards: Sequence[Mapping[str, Any]], tp_size: int, rules: Rules = LLAMA_TP_RULES) -> list[dict[str, Any]]:
    """Converts shards saved at one tensor-parallel degree into ``tp_size`` shards (merge, then split)."""
    if len(shards) == tp_size:
        return [dict(s) for s in shards]
    return split_state_dict(merge_state_dicts(shards, rules), tp_size, rules)


def private_replicas(views: Mapping[str, Any], rules: Rules = LLAMA_TP_RULES) -> dict[str, Any]:
    """``views`` (``shard_views`` of a rank after the first) with each replicated tensor replaced by a copy: the
    first rank's delta already changed the shared tensor, and an XOR applied twice undoes itself, so the other
    ranks apply theirs to a copy (and prove it there) while the model keeps the first rank's result."""
    return {n: (t.clone() if split_axis(n, rules) is None else t) for n, t in views.items()}


def shard_views(state: Mapping[str, Any], rank: int, tp_size: int, rules: Rules = LLAMA_TP_RULES) -> dict[str, Any]:
    """Rank ``rank``'s slice of each full Paddle tensor, as views: loading rank files into these writes straight
    into the full model, so one process can hold a whole tensor-parallel group without a staging copy.
    Replicated tensors appear in every rank's views (each rank's files carry them; the last one loaded stays)."""
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of {tp_size}")
    views = {}
    for name, x in state.items():
        axis = split_axis(name, rules)
        if axis is None or tp_size == 1:
            views[name] = x
            continue
        size = x.shape[axis]
        if size % tp_size:
            raise ValueError(f"{name} {list(x.shape)}: axis {axis} does not divide into {tp_size} ranks")
        step = size // tp_size
        index = [slice(None)] * len(x.shape)
        index[axis] = slice(rank * step, (rank + 1) * step)
        views[name] = x[tuple(index)]
    return views
