"""FastDeploy's inference layout, and a version staged in it in a FastDeploy model directory.

A FastDeploy server started with ``--dynamic-load-weight`` (load strategy ``ipc_snapshot``) builds the class
``architectures[0] + "RL"`` (``fastdeploy/rl/rollout_model.py``, registered by ``fastdeploy/rl/__init__.py``) and
each of its workers (global rank ``R = paddle.distributed.get_rank()``, physical GPU
``G = CUDA_VISIBLE_DEVICES[FLAGS_selected_gpus]``) reloads ``{model_dir}/model_state.tp{R}.{G}.part*.pdparams``,
safetensors content read by ``paddle.load(path, safetensors=True)``, sorted by ``\\.part(\\d+)\\.``
(``fastdeploy/rl/dynamic_weight_manager.py``, ``_update_ipc_snapshot``). Every name in a file is matched against the
inference model's own ``state_dict()``; an unmatched name is skipped at debug level, silently
(``_update_model_from_state``). So the files must hold FastDeploy's inference tensors, per worker, exactly:

==============================================  =====================  ==========================================
name (``P`` = ``qwen2`` for Qwen2, ``model``     shape on rank r of T   made from the canonical tensors
for Qwen3)                                                             (Hugging Face names, ``[in, out]``)
==============================================  =====================  ==========================================
``P.embed_tokens.embeddings.weight``             ``[Vp/T, H]``          rows of ``embed_tokens``, zero rows up to
                                                                        ``Vp`` = V rounded up to 64
``P.layers.i.self_attn.qkv_proj.weight``         ``[H, (nh/T+2k)·hd]``  ``[q_r | k_s | v_s]`` columns
``P.layers.i.self_attn.qkv_proj.bias`` (Qwen2)   ``[(nh/T+2k)·hd]``     the same of the biases
``P.layers.i.self_attn.o_proj.weight``           ``[nh·hd/T, H]``       rows
``P.layers.i.self_attn.q_norm.weight``, ``k_norm`` (Qwen3)  ``[hd]``    as they are
``P.layers.i.mlp.up_gate_proj.weight``           ``[H, 2·I/T]``         ``[gate_r | up_r]``: gate first
``P.layers.i.mlp.down_proj.weight``              ``[I/T, H]``           rows
``P.layers.i.input_layernorm.weight``, ``post_attention_layernorm.weight``, ``P.norm.weight``: as they are
``lm_head.linear.weight``                        ``[H, V'/T]``          columns of ``lm_head`` (the embedding's
                                                                        transpose when tied: it is its own
                                                                        parameter even then); V' = V, or V rounded
                                                                        up to 64 when T does not divide V
==============================================  =====================  ==========================================

With ``kvh`` kv heads: ``k = kvh/T`` and ``s = r`` when ``kvh >= T``; else every rank holds one kv head, ``k = 1``,
``s = r // (T / kvh)``. Sources: ``fastdeploy/model_executor/models/qwen2.py`` and ``qwen3.py`` (module names, the
LM head built even when tied), ``layers/linear.py`` (``QKVParallelLinear``, ``MergedColumnParallelLinear.weight_loader``
for the fused orders, ``RowParallelLinear``; every weight ``[in, out]`` under dynamic loading),
``layers/embeddings.py`` and ``layers/utils.py`` (``pad_vocab_size`` to 64), ``layers/lm_head.py``. Not confirmed:
the newest ``qwen3.py`` may hold the norms as ``self_attn.qk_norm.q_norm.weight`` (Qwen3-VL maps to that); the
names here are those of the ``qwen3.py`` that was read, and a server's ``Model param:`` log lines list its own.

``rollout_model.py`` has RL classes for Qwen2 and Qwen3 among the families Baton serves; none for Llama, Mistral or
dense ERNIE 4.5, which FastDeploy therefore cannot reload with dynamic loading: those are refused here.
"""

from __future__ import annotations

import fnmatch
import json
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import layout
from .errors import IncompatibleTargetError
from .families import Sizes, check_model_fits, sizes_of
from .fs import join, listing, open_fs, storage_calls
from .hfdir import CONFIG_FILE, read_json
from .tensorfile import DTYPE_CODES, encode_header, itemsize
from .whole import Scratch, WholeTensors, open_version, transpose

VOCAB_PADDING = 64  # fastdeploy/model_executor/layers/utils.py DEFAULT_VOCAB_PADDING_SIZE
# a config.json's torch_dtype -> the dtype code of the tensors a model of it holds (Paddle's names are torch's here)
CONFIG_DTYPES = {DTYPE_CODES[code][1]: code for code in ("F32", "BF16", "F16")}
VERSION_FILE = "version.yaml"  # FastDeploy's own record of a model dir's version (``step:``), read by its rsync path


@dataclass(frozen=True)
class RLModel:
    """FastDeploy's inference model of one architecture, as its ``...RL`` class holds it."""

    prefix: str
    qkv_bias: bool
    qk_norm: bool


RL_MODELS = {"Qwen2ForCausalLM": RLModel("qwen2", True, False), "Qwen3ForCausalLM": RLModel("model", False, True)}


@dataclass(frozen=True)
class WorkerTensor:
    """One tensor of a worker's state dict: the canonical tensors it is made of, and how: ``build(rank, *inputs)``
    gives blocks whose concatenation along the last axis is the tensor."""

    name: str
    shape: tuple[int, ...]  # the same on every worker
    inputs: tuple[str, ...]
    build: Callable[..., list[np.ndarray]]


def _pad(n: int) -> int:
    return -(-n // VOCAB_PADDING) * VOCAB_PADDING


def _rows(a: np.ndarray, start: int, n: int) -> np.ndarray:
    """Rows ``[start, start + n)`` of ``a``, zero beyond its end (FastDeploy's vocabulary padding)."""
    if start + n <= a.shape[0]:
        return a[start:start + n]
    out = np.zeros((n, *a.shape[1:]), a.dtype)
    real = max(0, a.shape[0] - start)
    out[:real] = a[start:start + real]
    return out


class WorkerLayout:
    """What every worker of a FastDeploy server running the model of ``config.json`` ``doc`` on ``tp_size`` GPUs
    holds (see the module's table). Models FastDeploy cannot reload, and sizes its tensor parallelism cannot
    divide, are refused here with the reason."""

    def __init__(self, doc: Mapping[str, Any], source: str, tp_size: int):
        arch = (doc.get("architectures") or [None])[0]
        if arch not in RL_MODELS:
            raise IncompatibleTargetError(
                f"{source}: FastDeploy has no {arch}RL class (fastdeploy/rl/rollout_model.py), so a server started "
                f"with --dynamic-load-weight cannot reload {arch}; Baton stages {', '.join(RL_MODELS)} for FastDeploy")
        self.sizes: Sizes = sizes_of(doc, source)
        self.model, self.tp = RL_MODELS[arch], tp_size
        s, t = self.sizes, tp_size
        self.vocab_rows = _pad(s.vocab)
        self.head_cols = s.vocab if s.vocab % t == 0 else _pad(s.vocab)
        kv_ok = s.kv_heads % t == 0 if s.kv_heads >= t else t % s.kv_heads == 0
        uneven = [f"{what} {n}" for what, n, ok in (
            ("attention heads", s.heads, s.heads % t == 0), ("kv heads", s.kv_heads, kv_ok),
            ("intermediate size", s.intermediate, s.intermediate % t == 0),
            ("padded vocabulary", self.vocab_rows, self.vocab_rows % t == 0),
            ("LM head columns", self.head_cols, self.head_cols % t == 0)) if not ok]
        if uneven:
            raise IncompatibleTargetError(f"{source}: FastDeploy cannot split {', '.join(uneven)} over {t} GPUs")

    def tensors(self) -> list[WorkerTensor]:
        s, t, p = self.sizes, self.tp, self.model.prefix
        hd, h = s.head_dim, s.hidden
        nq, ni = s.heads // t * hd, s.intermediate // t
        nkv = (s.kv_heads // t if s.kv_heads >= t else 1) * hd
        group = 1 if s.kv_heads >= t else t // s.kv_heads  # ranks sharing one kv head

        def qkv(r, q, k, v):
            b = r // group
            return [q[..., r * nq:(r + 1) * nq], k[..., b * nkv:(b + 1) * nkv], v[..., b * nkv:(b + 1) * nkv]]

        def up_gate(r, gate, up):
            return [gate[:, r * ni:(r + 1) * ni], up[:, r * ni:(r + 1) * ni]]

        def rows(n):
            return lambda r, a: [a[r * n:(r + 1) * n]]

        def same(r, a):
            return [a]

        embed_n, head_n = self.vocab_rows // t, self.head_cols // t

        def embed(r, e):
            return [_rows(e, r * embed_n, embed_n)]

        def head(r, w):
            if s.tied:  # w is the embedding [V, H]
                return [transpose(_rows(w, r * head_n, head_n))]
            start, stop = r * head_n, min((r + 1) * head_n, s.vocab)
            pad = (r + 1) * head_n - max(stop, start)
            return [w[:, start:stop]] + ([np.zeros((h, pad), w.dtype)] if pad else [])

        out = [WorkerTensor(f"{p}.embed_tokens.embeddings.weight", (embed_n, h), ("model.embed_tokens.weight",), embed)]
        for i in range(s.layers):
            c, f = f"model.layers.{i}.", f"{p}.layers.{i}."
            qkv_in = tuple(f"{c}self_attn.{x}_proj.weight" for x in "qkv")
            out.append(WorkerTensor(f"{f}self_attn.qkv_proj.weight", (h, nq + 2 * nkv), qkv_in, qkv))
            if self.model.qkv_bias:
                bias_in = tuple(f"{c}self_attn.{x}_proj.bias" for x in "qkv")
                out.append(WorkerTensor(f"{f}self_attn.qkv_proj.bias", (nq + 2 * nkv,), bias_in, qkv))
            out.append(WorkerTensor(f"{f}self_attn.o_proj.weight", (s.heads * hd // t, h),
                                    (f"{c}self_attn.o_proj.weight",), rows(s.heads * hd // t)))
            names = ["input_layernorm", "post_attention_layernorm"]
            names += ["self_attn.q_norm", "self_attn.k_norm"] if self.model.qk_norm else []
            out += [WorkerTensor(f"{f}{n}.weight", (hd if n.startswith("self_attn.") else h,), (f"{c}{n}.weight",),
                                 same)
                    for n in names]
            out.append(WorkerTensor(f"{f}mlp.up_gate_proj.weight", (h, 2 * ni),
                             (f"{c}mlp.gate_proj.weight", f"{c}mlp.up_proj.weight"), up_gate))
            out.append(WorkerTensor(f"{f}mlp.down_proj.weight", (ni, h), (f"{c}mlp.down_proj.weight",), rows(ni)))
        out.append(WorkerTensor(f"{p}.norm.weight", (h,), ("model.norm.weight",), same))
        head_in = "model.embed_tokens.weight" if s.tied else "lm_head.weight"
        out.append(WorkerTensor("lm_head.linear.weight", (h, head_n), (head_in,), head))
        return out


def server_config(model_dir: str, config: str | None = None) -> tuple[dict[str, Any], str]:
    """``(doc, url)`` of the ``config.json`` the server's model was built from: ``config`` (a file, or a
    directory holding one) or the model directory's own."""
    fs, path = open_fs(config or model_dir)
    if fs.isdir(path):
        path = join(path, CONFIG_FILE)
    url = fs.unstrip_protocol(path)
    try:
        return read_json(fs.cat_file(path), url), url
    except FileNotFoundError:
        raise FileNotFoundError(f"{url} does not exist: FastDeploy builds its model from the config.json in its "
                                "model directory; Baton needs it to stage the version in that model's layout") from None


def _write_part(fs, path: str, pieces: list[WorkerTensor], rank: int, held: Mapping[str, np.ndarray],
                codes: Mapping[str, str], version: str, scratch: Scratch) -> int:
    """One worker's part file holding ``pieces``, written tensor by tensor after the header; returns its bytes."""
    items = [(pc.name, codes[pc.inputs[0]], pc.shape, int(np.prod(pc.shape)) * itemsize(codes[pc.inputs[0]]))
             for pc in pieces]
    header = encode_header(items, {"format": "paddle", "baton_version": version})
    with fs.open(path, "wb") as f:
        f.write(header)
        for pc in pieces:
            blocks = pc.build(rank, *(held[n] for n in pc.inputs))
            shape = (*blocks[0].shape[:-1], sum(b.shape[-1] for b in blocks))
            if shape != pc.shape or any(b.shape[:-1] != blocks[0].shape[:-1] for b in blocks):
                # never expected: the pre-flight has checked every input's shape against the server's config
                raise AssertionError(f"{pc.name}: built {[b.shape for b in blocks]}, FastDeploy holds {pc.shape}")
            f.write(memoryview(scratch.join(blocks)).cast("B"))
    return len(header) + sum(i[3] for i in items)


def worker_part_name(rank: int, gpu: int, index: int) -> str:
    """Part ``index`` of the files the worker of global rank ``rank`` on GPU ``gpu`` loads."""
    return f"model_state.tp{layout.check_rank(rank)}.{layout.check_rank(gpu)}.part{index}.pdparams"


def fastdeploy_glob(rank: int, gpu: int) -> str:
    """The files FastDeploy's first level loads for one worker (its ``{base}.part*.pdparams``)."""
    return worker_part_name(rank, gpu, 0).replace(".part0.", ".part*.")


@storage_calls
def export_fastdeploy(snapshot_root: str, version: str, model_dir: str, gpu_ids: Sequence[int], *,
                      config: str | None = None, before_swap: Callable[[dict], None] | None = None,
                      storage_options: dict[str, Any] | None = None, reader: WholeTensors | None = None) -> dict:
    """Put ``version`` in a FastDeploy model directory for a server whose worker ``r`` runs on GPU ``gpu_ids[r]``:
    each worker's tensors in FastDeploy's inference layout (the module's table) as
    ``model_state.tp{r}.{gpu_ids[r]}.part{N}.pdparams``, N from 1, split from the canonical tensors whatever
    tensor-parallel degree the version was published with.

    Before anything in ``model_dir`` changes, the version must be exactly the model of the server's
    ``config.json`` (``config``, else ``model_dir``'s): every tensor, shape and dtype (``IncompatibleTargetError``
    names what does not fit). The parts are written beside, checked against the layout, then swapped in:
    ``before_swap(placed)`` is called first (the caller records that a swap is under way), then the parts of
    those names the new set does not overwrite are removed (FastDeploy would load them too), the new ones moved
    in, and ``version.yaml`` gets ``step: version``. Returns ``placed``: ``{"files", "bytes", "config"}``.
    ``reader``: the version as ``storage.whole.open_version`` gave it, when the caller opened it already."""
    layout.check_id(version)
    if not gpu_ids:
        raise ValueError("gpu_ids is empty: give the GPU number of each worker of the FastDeploy server")
    doc, config_url = server_config(model_dir, config)
    plan = WorkerLayout(doc, config_url, len(gpu_ids))
    reader = reader or open_version(snapshot_root, version, storage_options)
    tensors = reader.index()
    dtype = CONFIG_DTYPES.get(plan.sizes.dtype) if plan.sizes.dtype else None
    if plan.sizes.dtype and dtype is None:
        raise IncompatibleTargetError(f"{config_url}: dtype {plan.sizes.dtype!r} is not one Baton stages "
                                      f"({', '.join(CONFIG_DTYPES)})")
    if dtype is None:
        raise IncompatibleTargetError(f"{config_url} names no torch_dtype, so the dtype of FastDeploy's parameters "
                                      "is unknown to Baton: add the dtype the server runs in")
    check_model_fits(tensors, doc, config_url, f"{snapshot_root} {version}", dtype)
    worker_tensors = plan.tensors()

    fs, root = open_fs(model_dir)
    mine = f".baton-stage.gpu{'-'.join(str(layout.check_rank(g)) for g in gpu_ids)}."
    for name in fs.ls(root, detail=False):  # left by a stage of this server that was killed: never loaded
        if name.rstrip("/").rsplit("/", 1)[-1].startswith(mine):
            fs.rm(name, recursive=True)
    stage = join(root, f"{mine}{uuid.uuid4().hex[:8]}")
    fs.makedirs(stage)
    try:
        new, total = _write_parts(fs, stage, reader, worker_tensors, gpu_ids, version)
        placed = {"files": new, "bytes": total, "config": config_url}
        if before_swap is not None:
            before_swap(placed)
        globs = [fastdeploy_glob(rank, gpu) for rank, gpu in enumerate(gpu_ids)]
        for name in listing(fs, root):
            if name not in new and any(fnmatch.fnmatchcase(name, g) for g in globs):
                fs.rm(join(root, name))
        for name in new:
            fs.mv(join(stage, name), join(root, name))
        fs.pipe_file(join(root, VERSION_FILE), f"step: {json.dumps(version)}\n".encode())
        return placed
    finally:
        if fs.exists(stage):
            fs.rm(stage, recursive=True)


def _write_parts(fs, stage: str, reader: WholeTensors, pieces: list[WorkerTensor], gpu_ids: Sequence[int],
                 version: str) -> tuple[list[str], int]:
    """Every worker's parts under ``stage``: part k holds the pieces whose last input is in the version's part k,
    so each canonical tensor is read once and held only until the pieces made from it are written."""
    headers = reader.sources[0].headers
    part_of = {e.name: p for p, h in enumerate(headers) for e in h.entries}
    groups: list[list[WorkerTensor]] = [[] for _ in headers]
    for pc in pieces:
        groups[max(part_of[n] for n in pc.inputs)].append(pc)
    uses = Counter(n for pc in pieces for n in pc.inputs)
    held: dict[str, np.ndarray] = {}
    codes = {name: code for name, (code, _) in reader.index().items()}
    scratch = Scratch()
    new, total, index = [], 0, 0
    for p, header in enumerate(headers):
        for e in header.entries:
            held[e.name] = reader.tensor(p, e.name)
        if not groups[p]:
            continue
        index += 1
        for rank, gpu in enumerate(gpu_ids):
            new.append(worker_part_name(rank, gpu, index))
            total += _write_part(fs, join(stage, new[-1]), groups[p], rank, held, codes, version, scratch)
        for pc in groups[p]:
            for n in pc.inputs:
                uses[n] -= 1
                if not uses[n]:
                    del held[n]
    return new, total
