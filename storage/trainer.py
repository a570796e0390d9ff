"""Checkpoints as Paddle's trainers write them (PaddleNLP / PaddleFormers ``Trainer``), read tensor by tensor into
Baton's canonical layout (Hugging Face names, Paddle's ``[in, out]``), so that publishing one holds about one part
of it in memory (the part being written, plus the tensor being joined from its ranks), whatever its tensor- and
pipeline-parallel degrees: ``part_bytes`` bounds it, not the checkpoint's size.

What the trainers write, from their code:

- File names (``paddlenlp/trainer/training_args.py`` ``weight_name_suffix``, ``paddleformers/transformers/
  model_utils.py`` ``_add_variant``): ``model_state.pdparams``, or ``model_state.{suffix}.pdparams`` where the
  suffix joins ``tp{rank:02d}`` (tensor parallel degree > 1) and ``pp{rank:02d}`` (pipeline degree > 1) with
  ``_``: ``model_state.tp00_pp01.pdparams``; ``model[.suffix].safetensors`` with ``safe_serialization``. Each is a
  ``paddle.save`` pickle (``paddle/framework/io.py``: ``{name: ndarray}`` plus a name table; bfloat16 as uint16
  bits) or safetensors. Sharding stage 1 with ``save_sharded_model`` adds ``_shard{rank:02d}`` and leaves the
  trainable weights out of bf16 runs (``paddlenlp/trainer/utils/sharding_io.py``: they live as fp32 master
  weights in the optimizer files), so those are refused. A unified checkpoint (``model-0000K-of-0000N
  .safetensors`` + ``model.safetensors.index.json``, ``paddlenlp/trainer/unified_checkpoint/``) holds each tensor
  once, tensor-parallel ranks already merged: one rank here. Optimizer, master-weight, scheduler, RNG and trainer
  state files are ignored.
- Names: a pipeline stage's file holds the single-card names with global layer indices
  (``PipelinePretrainedModel._set_pipeline_name_mapping`` / ``state_dict``), so stages merge by union; the
  embedding is on the first stage, the final norm and the LM head on the last, and a tied head appears there as
  ``lm_head.weight`` ``[vocab, hidden]`` (``llama/modeling_pp.py``, ``nn/pp_model.py``). PaddleNLP prefixes the
  backbone ``llama.`` / ``qwen2.``..., PaddleFormers ``model.``. Linear weights are ``[in, out]``; the LM head is
  ``[hidden, vocab]`` in PaddleNLP and ``[vocab, hidden]`` in PaddleFormers (``nn/lm_head.py``): told by shape.
- Tensor parallelism (``_get_tensor_parallel_mappings``): q/k/v/gate/up (and fused) weights split by columns,
  their biases likewise, o/down and the embedding by rows, the LM head along its vocabulary; norms replicated;
  k/v replicated when the kv heads do not divide. Which axis a tensor was split on is read from the shapes
  against ``config.json`` (the file names carry the degrees; the saved config says 1), by the rules of
  ``storage.tp`` without a config.
- Fused projections: ``qkv_proj`` (``fuse_attention_qkv``) holds, per kv head, ``[its G = heads/kv_heads q heads
  | k | v]`` of ``head_dim`` columns each (``llama/modeling.py``: ``reshape`` to ``[.., kv_heads, (G + 2) *
  head_dim]``; its bias alike), a rank holding its own kv heads, so ranks join by plain concatenation;
  ``gate_up_fused_proj`` (PaddleNLP) / ``up_gate_proj`` (PaddleFormers) holds ``[gate_r | up_r]`` per rank,
  gate first (``paddle.chunk(.., 2, axis=-1)``; ``conversion_utils.naive_fuse_merge_tp``). Each rank's fused tensor
  is unfused first, then the pieces join across ranks.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .apply import apply_source
from .errors import IncompatibleTargetError
from .families import FAMILIES, canonical_shapes, check_model_fits
from .fs import join, listing, open_fs
from .hfdir import INDEX_FILE, FusedTensorError, canonical, hf_tensors, is_hf_checkpoint, read_json, weight_files
from .pickle_safe import load_state_pickle
from .resolve import probe_file
from .tensorfile import TensorRef, code_of_saved, paddle_eager, read_headers
from .tp import LLAMA_TP_RULES, Rules, split_axis

WEIGHT_FILE = re.compile(r"model_state(?:\.(?P<a>[a-z0-9_]+))?\.pdparams|model(?:\.(?P<b>[a-z0-9_]+))?\.safetensors")
SUFFIX = re.compile(r"(?:tp(?P<tp>\d+))?_?(?:pp(?P<pp>\d+))?(?:_?shard(?P<shard>\d+))?")
SHARD_FILE = re.compile(r"_?shard\d+\.(pdparams|safetensors)$")
CONFIG_FILES = ("config.json", "model_config.json")  # the second in older PaddleNLP checkpoints
FUSED_QKV = re.compile(r"\.self_attn\.qkv_proj\.(weight|bias)$")
FUSED_FFN = re.compile(r"\.mlp\.(gate_up_fused_proj|up_gate_proj)\.(weight|bias)$")


@dataclass(frozen=True)
class Lazy:
    """A tensor of a trainer file, read when asked."""

    code: str
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    where: str  # the file, for messages


@dataclass(frozen=True)
class Piece:
    """One rank's share of a canonical tensor: ``take`` applied to its source (an unfused slice, a transpose)."""

    source: Lazy
    shape: tuple[int, ...]
    take: Callable[[np.ndarray], np.ndarray] | None = None


class Checkpoint:
    """A trainer checkpoint's weight files by ``(tp, pp)`` rank, indexed without reading tensor data."""

    def __init__(self, source: str, storage_options: dict[str, Any] | None = None):
        self.source = source
        fs, path = open_fs(source, storage_options)
        self.fs, self.config, self.config_url = fs, None, None
        self.sharded = False
        if fs.isfile(path):
            self.ranks = {(0, 0): [path]}
            return
        names = listing(fs, path)
        if not names and not fs.exists(path):
            raise FileNotFoundError(f"{source}: no such checkpoint file or directory")
        for name in CONFIG_FILES:
            if name in names:
                self.config_url = fs.unstrip_protocol(join(path, name))
                self.config = read_json(fs.cat_file(join(path, name)), self.config_url)
                break
        self.ranks = _rank_files(fs, path, names, source)
        self.sharded = any(SHARD_FILE.search(paths[0]) for paths in self.ranks.values())

    @property
    def degrees(self) -> tuple[int, int]:
        return 1 + max(t for t, _ in self.ranks), 1 + max(p for _, p in self.ranks)

    def index(self) -> dict[tuple[int, int], dict[str, Lazy]]:
        """Each rank's tensors (every file's header or pickle opcodes read; no tensor data)."""
        out = {}
        for rank, paths in sorted(self.ranks.items()):
            tensors: dict[str, Lazy] = {}
            for path in paths:
                for name, lazy in _file_index(self.fs, path).items():
                    if name in tensors:
                        raise ValueError(f"{lazy.where}: tensor {name!r} is also in {tensors[name].where}")
                    tensors[name] = lazy
            out[rank] = tensors
        return out


def _rank_files(fs, path: str, names: Mapping[str, int], source: str) -> dict[tuple[int, int], list[str]]:
    if INDEX_FILE in names:  # a unified checkpoint: tensors already merged, spread over the files it lists
        return {(0, 0): [join(path, f) for f in weight_files(fs, path, names, source)]}
    ranks: dict[tuple[int, int], list[str]] = {}
    shards: dict[tuple[int, int], dict[int, str]] = {}
    for name in sorted(names):
        m = WEIGHT_FILE.fullmatch(name)
        if not m:
            continue
        suffix = SUFFIX.fullmatch(m.group("a") or m.group("b") or "")
        if suffix is None:
            raise ValueError(f"{source}/{name}: a weight file whose suffix is not tpNN_ppNN (what Paddle's trainers "
                             "write); rename it or remove it")
        key = (int(suffix.group("tp") or 0), int(suffix.group("pp") or 0))
        shard = int(suffix.group("shard")) if suffix.group("shard") is not None else None
        held = shards.setdefault(key, {})
        if shard in held:
            raise ValueError(f"{source}: {name} and {held[shard]} are the same tensor rank, pipeline stage and "
                             "sharding rank: keep one")
        held[shard] = name
    marked = {key: sorted(held) for key, held in shards.items()}
    if any(None in s for s in marked.values()) and any(s != [None] for s in marked.values()):
        raise ValueError(f"{source}: some weight files name a sharding rank (shardNN) and some do not: files of two "
                         "runs are mixed; keep one run's files")
    count = 1 + max((i for s in marked.values() for i in s if i is not None), default=0)
    for key, held in shards.items():
        if None not in held and sorted(held) != list(range(count)):
            raise ValueError(f"{source}: sharding rank(s) {sorted(set(range(count)) - set(held))} of tensor rank "
                             f"{key[0]}, pipeline stage {key[1]} missing")
        ranks[key] = [join(path, held[i]) for i in sorted(held, key=lambda i: -1 if i is None else i)]
    if not ranks:
        singles = sorted(n for n in names if n.endswith((".pdparams", ".safetensors")) and not _ignored(n))
        if len(singles) == 1:
            return {(0, 0): [join(path, singles[0])]}
        raise ValueError(f"{source}: expected model_state[.tpNN][_ppNN].pdparams files (as Paddle's trainers save "
                         f"them), one state dict file, or a unified checkpoint; found "
                         f"{sorted(names)[:10] or 'nothing'}")
    _check_grid(ranks, source)
    return ranks


def _ignored(name: str) -> bool:
    return name.startswith(("optimizer", "master_weights", "scheduler", "scaler", "lora_", "peft_", "rng_state"))


def _check_grid(ranks: Mapping[tuple[int, int], list[str]], source: str) -> None:
    """Every tensor rank of every pipeline stage, once, all named alike: a gap, or files of two parallel layouts, is
    refused, naming the files."""
    names = {key: paths[0].rsplit("/", 1)[-1] for key, paths in ranks.items()}
    for part in ("tp", "pp"):
        marked = sorted(n for n in names.values() if re.search(rf"[._]{part}\d", n))
        if marked and len(marked) != len(names):
            plain = sorted(set(names.values()) - set(marked))
            raise ValueError(f"{source}: {marked[0]} names a {part} rank and {plain[0]} does not: files saved with two "
                             "parallel layouts are mixed; keep one run's files")
    tp, pp = 1 + max(t for t, _ in ranks), 1 + max(p for _, p in ranks)
    for part, degree, what in (("tp", tp, "tensor rank"), ("pp", pp, "pipeline stage")):
        if degree == 1 and any(re.search(rf"[._]{part}\d", n) for n in names.values()):
            raise ValueError(f"{source}: only {what} 0 is here, yet its files are named {part}NN, which the trainer "
                             f"writes only for several: the other {what}s' files are missing")
    stages = sorted({p for _, p in ranks})
    if stages != list(range(pp)):
        raise ValueError(f"{source}: pipeline stage(s) {sorted(set(range(pp)) - set(stages))} missing (found stages "
                         f"{stages}): the checkpoint is incomplete, or still being written")
    for p in range(pp):
        missing = [t for t in range(tp) if (t, p) not in ranks]
        if missing:
            raise ValueError(f"{source}: tensor rank(s) {missing} of pipeline stage {p} missing (the checkpoint has "
                             f"{tp} tensor ranks): it is incomplete, or files of two runs are mixed")


def _file_index(fs, path: str) -> dict[str, Lazy]:
    """The tensors of one file: a pickle's arrays left where they are (``load_state_pickle(lazy=True)``), or a
    safetensors header; each read by range when asked."""
    url = fs.unstrip_protocol(path)
    if fs.cat_file(path, start=0, end=1) == b"\x80":
        with fs.open(path, "rb", block_size=1 << 20) as f:
            entries = load_state_pickle(f, url, lazy=True)
        out = {}
        for name, v in entries.items():
            code = code_of_saved(v)
            read = (lambda v=v: v) if isinstance(v, np.ndarray) else (
                lambda v=v: v.array(fs.cat_file(path, start=v.offset, end=v.offset + v.nbytes)))
            out[name] = Lazy(code, tuple(v.shape), read, url)
        return out
    header = read_headers(fs, [path], [fs.size(path)])[0]
    return {e.name: Lazy(e.dtype, tuple(e.shape), _range_reader(fs, path, e), url) for e in header.entries}


def _range_reader(fs, path: str, e) -> Callable[[], np.ndarray]:
    return lambda: e.array(fs.cat_file(path, start=e.start, end=e.end), 0)


def is_decoder(names) -> bool:
    """Whether a checkpoint's names are a decoder's (Hugging Face or Paddle trainer names), which Baton can
    put in its canonical layout; anything else is published as saved."""
    return any((c := canonical(n)) and (c.startswith("model.layers.") or c == "lm_head.weight") for n in names)


class _Recent:
    """The last few fused tensors read: q, k and v (gate and up) come from one read of each rank's tensor."""

    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict()

    def read(self, lazy: Lazy) -> np.ndarray:
        key = id(lazy)
        if key not in self.items:
            self.items[key] = (lazy, lazy.read())  # the Lazy is kept so its id is not reused
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return self.items[key][1]


def _heads(config: Mapping[str, Any] | None, where: str) -> tuple[int, int, int]:
    """(q heads per kv head G, kv heads, head_dim) from the config, which fused tensors need."""
    if not config:
        raise ValueError(f"{where}: a fused qkv_proj can be split only with the model's config.json (heads, kv heads) "
                         "beside the checkpoint files")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv = config.get("num_key_value_heads") or heads
    return heads // kv, kv, config.get("head_dim") or hidden // heads


def _unfuse(name: str, lazy: Lazy, config: Mapping[str, Any] | None, tp: int) -> list[tuple[str, Piece]]:
    """A rank's fused tensor as the canonical pieces it holds (q/k/v, or gate/up), each a slice of one read."""
    where = f"{lazy.where}: {name} {list(lazy.shape)}"
    if m := FUSED_QKV.search(name):
        g, kv, d = _heads(config, where)
        width = lazy.shape[-1] if m.group(1) == "weight" else lazy.shape[0]
        local, rest = divmod(width, (g + 2) * d)
        if rest or local * tp != kv:
            raise ValueError(f"{where} does not fit {kv} kv heads of {g} q heads and {d} dims over {tp} tensor "
                             "ranks (config.json): not this model's checkpoint, or not a fused qkv layout Baton reads")
        base = name[:m.start()] + ".self_attn."

        def part(lo: int, hi: int) -> Callable[[np.ndarray], np.ndarray]:
            def take(a: np.ndarray) -> np.ndarray:
                grouped = a.reshape(*a.shape[:-1], local, g + 2, d)[..., lo:hi, :]
                return np.ascontiguousarray(grouped.reshape(*a.shape[:-1], local * (hi - lo) * d))
            return take

        lead = lazy.shape[:-1]
        return [(f"{base}{x}_proj.{m.group(1)}", Piece(lazy, (*lead, local * (hi - lo) * d), part(lo, hi)))
                for x, lo, hi in (("q", 0, g), ("k", g, g + 1), ("v", g + 1, g + 2))]
    m = FUSED_FFN.search(name)
    half, rest = divmod(lazy.shape[-1], 2)
    if rest:
        raise ValueError(f"{where}: a fused gate/up tensor of odd width")
    base = name[:m.start()] + ".mlp."
    lead = lazy.shape[:-1]
    gate = Piece(lazy, (*lead, half), lambda a: np.ascontiguousarray(a[..., :half]))
    up = Piece(lazy, (*lead, half), lambda a: np.ascontiguousarray(a[..., half:]))
    return [(f"{base}gate_proj.{m.group(2)}", gate), (f"{base}up_proj.{m.group(2)}", up)]


def _merge_axis(name: str, shapes: list[tuple[int, ...]], full: tuple[int, ...] | None, rules: Rules) -> int | None:
    """The axis the ranks' pieces join on: read from their shapes against the full one when the config gives it
    (k/v stay whole when the kv heads do not divide), else the rules'."""
    if len(shapes) == 1:
        return None
    if full is None:
        return split_axis(name, rules)
    if all(s == full for s in shapes):
        return None
    for a in range(len(full)):
        if sum(s[a] for s in shapes) == full[a] and all(s[:a] + s[a + 1:] == full[:a] + full[a + 1:] for s in shapes):
            return a
    raise ValueError(f"{name}: the tensor ranks hold {shapes}, which do not join into {list(full)} (config.json)")


def trainer_tensors(source: str, *, rank: int = 0, tp_size: int = 1, rules: Rules = LLAMA_TP_RULES,
                    storage_options: dict[str, Any] | None = None) -> dict[str, TensorRef]:
    """Serving rank ``rank``'s shard (of ``tp_size``) of a decoder checkpoint written by a Paddle trainer at any
    tensor- and pipeline-parallel degree, canonical, as ``TensorRef`` s read one at a time when ``storage.publish``
    writes their part. Everything is checked before a byte of tensor data is read: a missing stage or rank, two
    degrees, a fused tensor that does not fit ``config.json``, and (with a config) any tensor missing, extra or
    misshapen is refused, naming the file."""
    ckpt = Checkpoint(source, storage_options)
    index = ckpt.index()
    tp, pp = ckpt.degrees
    if not is_decoder(n for tensors in index.values() for n in tensors):
        return _as_saved(index, source, pp, tp, rank, tp_size)
    config = ckpt.config
    known = bool(config) and (config.get("architectures") or [None])[0] in FAMILIES
    full = canonical_shapes(config, ckpt.config_url) if known else {}
    tied = bool(config and config.get("tie_word_embeddings"))
    pieces: dict[str, list[Piece]] = {}  # canonical name -> its pieces in tensor-rank order
    owner: dict[str, tuple[int, int]] = {}
    for (t, p), tensors in sorted(index.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for name, lazy in tensors.items():
            c = canonical(name)
            if c is None or (c == "lm_head.weight" and tied):
                continue  # a tied head is the embedding (the last stage keeps a copy)
            expanded = _unfuse(c, lazy, config, tp) if FUSED_QKV.search(c) or FUSED_FFN.search(c) else \
                [(c, Piece(lazy, lazy.shape))]
            for cname, piece in expanded:
                if cname in owner and owner[cname][1] != p:
                    raise ValueError(f"{lazy.where}: {name} is also in pipeline stage {owner[cname][1]}'s file")
                owner.setdefault(cname, (t, p))
                pieces.setdefault(cname, []).append(piece)
    hidden = _hidden(config, pieces)
    for name, ps in pieces.items():
        if len(ps) != tp and len(ps) != 1:
            raise ValueError(f"{ps[0].source.where}: {name} is in {len(ps)} of the {tp} tensor ranks")
        if name == "lm_head.weight" and hidden is not None:  # PaddleFormers keeps it [vocab, hidden]: flip to ours
            pieces[name] = [Piece(x.source, x.shape[::-1], _flip(x.take)) if x.shape[-1] == hidden and
                            x.shape[0] != hidden else x for x in ps]
    merged = {name: (ps, _merge_axis(name, [x.shape for x in ps], full.get(name), rules))
              for name, ps in pieces.items()}
    shapes = {name: (ps[0].source.code, _joined([x.shape for x in ps], axis)) for name, (ps, axis) in merged.items()}
    if ckpt.sharded and not known:
        raise ValueError(f"{source}: sharding-stage-1 files (save_sharded_model) split the weights among sharding "
                         "ranks; Baton checks that all of them are there against the model's config.json, which is "
                         "missing or names an architecture Baton does not know")
    if known:
        try:
            check_model_fits(shapes, config, ckpt.config_url, source, target="the model of its config.json",
                       advice="The checkpoint is incomplete, or its config.json is another model's")
        except IncompatibleTargetError as exc:
            if not ckpt.sharded:
                raise
            raise IncompatibleTargetError(f"{exc}. These are sharding-stage-1 files (save_sharded_model): in bf16 runs "
                                          "they lack the trainable weights, which live only as master weights in the "
                                          "optimizer files; save the checkpoint with unified_checkpoint") from None
    recent = _Recent(tp)  # one fused tensor of every rank: q, k and v are written one after the other
    out = {}
    for name, (ps, axis) in merged.items():
        code, shape = shapes[name]
        serve_axis = split_axis(name, rules) if tp_size > 1 else None
        if serve_axis is not None and shape[serve_axis] % tp_size:
            raise IncompatibleTargetError(f"{source}: {name} {list(shape)}: axis {serve_axis} does not divide into "
                                          f"{tp_size} serving ranks")
        served = shape if serve_axis is None else \
            (*shape[:serve_axis], shape[serve_axis] // tp_size, *shape[serve_axis + 1:])
        out[name] = TensorRef(code, served, _reader(ps, axis, serve_axis, rank, tp_size, recent))
    return out


def _hidden(config: Mapping[str, Any] | None, pieces: Mapping[str, list[Piece]]) -> int | None:
    if config and isinstance(config.get("hidden_size"), int):
        return config["hidden_size"]
    embed = pieces.get("model.embed_tokens.weight")
    return embed[0].shape[1] if embed and len(embed[0].shape) == 2 else None


def _flip(take):
    return lambda a: np.ascontiguousarray((take(a) if take else a).T)


def _joined(shapes: list[tuple[int, ...]], axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(shapes[0])
    return tuple(sum(s[axis] for s in shapes) if d == axis else n for d, n in enumerate(shapes[0]))


def _reader(ps: list[Piece], axis: int | None, serve_axis: int | None, rank: int, tp_size: int, recent: _Recent):
    def value(x: Piece) -> np.ndarray:
        raw = recent.read(x.source) if x.take is not None else x.source.read()
        return x.take(raw) if x.take is not None else raw

    def read() -> np.ndarray:
        if serve_axis is not None and axis == serve_axis and len(ps) == tp_size and \
                len({x.shape[axis] for x in ps}) == 1:
            return np.ascontiguousarray(value(ps[rank]))  # the trainer's rank is the serving rank's slice
        whole = value(ps[0]) if axis is None else np.concatenate([value(x) for x in ps], axis=axis)
        if serve_axis is None:
            return np.ascontiguousarray(whole)
        step = whole.shape[serve_axis] // tp_size
        index = (slice(None),) * serve_axis + (slice(rank * step, (rank + 1) * step),)
        return np.ascontiguousarray(whole[index])
    return read


def _as_saved(index: Mapping[tuple[int, int], dict[str, Lazy]], source: str, pp: int, tp: int, rank: int,
              tp_size: int) -> dict[str, TensorRef]:
    """A checkpoint whose names are not a decoder's: each of its files is one serving rank, as it is."""
    if pp > 1 or tp != tp_size:
        raise ValueError(f"{source}: its tensor names are not a decoder's (Hugging Face or Paddle trainer names), so "
                         f"Baton cannot merge or split it: it is published as saved, one file per rank ({tp} "
                         f"tensor ranks, {pp} pipeline stages; asked for {tp_size} serving ranks)")
    return {n: TensorRef(x.code, x.shape, x.read) for n, x in index[(rank, 0)].items()}


def checkpoint_tensors(source: str, *, rank: int = 0, tp_size: int = 1,
                       storage_options: dict[str, Any] | None = None) -> dict[str, TensorRef]:
    """Serving rank ``rank``'s shard (of ``tp_size``) of any checkpoint Baton publishes: a Hugging Face directory
    (``storage.hf_tensors``), else what a Paddle trainer saved (``trainer_tensors``, which also reads a unified
    checkpoint with fused projections)."""
    if is_hf_checkpoint(source, storage_options):
        try:
            return hf_tensors(source, rank=rank, tp_size=tp_size, storage_options=storage_options)
        except FusedTensorError:
            pass  # fused projections: a Paddle trainer's unified checkpoint, [in, out]
    return trainer_tensors(source, rank=rank, tp_size=tp_size, storage_options=storage_options)


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
        return {n: _adopt(a, code_of_saved(a)) for n, a in arrays.items()}
    src = probe_file(fs, root, names, name)
    return apply_source(src, None, verify="none", label=f"read {name}")[0]


def _adopt(arr: np.ndarray, code: str) -> Any:
    """A Paddle tensor over the unpickled array's own memory (no copy); bfloat16 arrives as uint16 bits."""
    paddle = paddle_eager()

    arr = np.ascontiguousarray(arr)
    if code == "BF16":  # Paddle views int16 (not uint16) as bfloat16
        arr = arr.view(np.int16)
    t = paddle.utils.dlpack.from_dlpack(arr) if arr.size else paddle.to_tensor(arr)
    return t.view(paddle.bfloat16) if code == "BF16" else t
