"""Hugging Face model directories: ``config.json`` becomes a ``ModelConfig``, the safetensors weights Baton's
canonical state, one tensor at a time, from any fsspec URL.

Canonical inside Baton (snapshots, live parameters): Hugging Face's names with Paddle's ``Linear`` layout
``[in, out]``. The one conversion happens as a tensor is read (``Weights.__getitem__`` here, ``TensorRef`` s from
``storage.hf_tensors`` when publishing): ``transformers`` checkpoints store Linear weights ``[out, in]`` and are
transposed; PaddleFormers checkpoints store ``[in, out]`` and are taken as they are, their older backbone names
(``llama.``, ``qwen2.``...) renamed to ``model.``; fused ``qkv_proj`` / ``up_gate_proj`` tensors are refused
(``storage.hfdir`` holds those name rules). Here every shape is also checked against ``config.json``: the
non-square projection weights must all be one way or all the other (square ones follow them; if every one is
square, the safetensors ``format`` metadata decides: ``pt`` is ``transformers``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import paddle

from infer.config import DTYPES, ModelConfig, RopeScaling
from infer.model import Decoder, build_model, parameter_shapes
from storage import join, listing, open_fs
from storage.families import FAMILIES, Family
from storage.hfdir import CONFIG_FILE, read_json, read_tensor, scan
from storage.tensorfile import TensorEntry

FLOAT_CODES = ("F32", "BF16", "F16")


class _Fields:
    """Reads fields of a JSON object, collecting every problem instead of stopping at the first."""

    def __init__(self, doc: Mapping[str, Any], problems: list[str], prefix: str = ""):
        self.doc, self.problems, self.prefix = doc, problems, prefix

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        value = self.doc.get(key)
        if value is None:
            if required:
                self.problems.append(f"missing field '{self.prefix}{key}'")
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problems.append(f"field '{self.prefix}{key}' is {value!r}, not {getattr(kind, '__name__', kind)}")
            return default
        return value


def config_from_hf(doc: Mapping[str, Any], *, dtype: str | None = None, max_seq_len: int | None = None,
                   name: str | None = None, source: str = CONFIG_FILE) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face ``config.json`` (``doc``) for a supported ``architectures[0]``.

    ``dtype`` defaults to the file's ``dtype`` / ``torch_dtype`` (float32 without one); ``max_seq_len`` (the
    context served) to ``max_position_embeddings``. Every unsupported or missing field is named in one
    ``ValueError`` that also names ``source``."""
    problems: list[str] = []
    f = _Fields(doc, problems)
    archs = f.get("architectures", list, [], required=True)
    family = FAMILIES.get(archs[0]) if archs else None
    if archs == [] and not problems:
        problems.append("field 'architectures' is empty")
    elif archs and family is None:
        problems.append(f"architectures {archs[0]!r} is not supported (supported: {', '.join(FAMILIES)})")
    if family is None:
        raise ValueError(f"{source}: " + "; ".join(problems))

    sizes = {key: f.get(key, int, 1, required=True) for key in ("hidden_size", "num_hidden_layers",
             "num_attention_heads", "intermediate_size", "vocab_size", "max_position_embeddings")}
    eps = f.get("rms_norm_eps", float, 1e-6, required=True)
    if f.get("hidden_act", str, "silu") != "silu":
        problems.append(f"hidden_act {doc['hidden_act']!r} is not supported (only 'silu')")
    if doc.get("quantization_config") is not None:
        problems.append("quantization_config: quantized checkpoints are not supported")
    bias = {key: (f.get(flag, bool, False) if isinstance(flag, str) else flag)
            for key, flag in (("qkv", family.qkv_bias), ("o", family.o_bias), ("mlp", family.mlp_bias))}
    theta, scaling = _rope(doc, family, problems)
    context = max_seq_len or sizes["max_position_embeddings"]
    if context > sizes["max_position_embeddings"]:
        problems.append(f"max_seq_len {context} exceeds max_position_embeddings {sizes['max_position_embeddings']}")
    _check_sliding_window(f, context, problems)
    weight_dtype = dtype or f.get("dtype", str) or f.get("torch_dtype", str) or "float32"
    if weight_dtype not in DTYPES:
        problems.append(f"dtype {weight_dtype!r} is not supported (one of {', '.join(DTYPES)})")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    try:
        return ModelConfig(
            name or doc.get("_name_or_path") or family.model_type, hidden=sizes["hidden_size"],
            layers=sizes["num_hidden_layers"], heads=sizes["num_attention_heads"],
            kv_heads=f.get("num_key_value_heads", int, sizes["num_attention_heads"]),
            intermediate=sizes["intermediate_size"], head_dim=f.get("head_dim", int),
            vocab_size=sizes["vocab_size"], max_seq_len=context, rope_theta=theta, rope_scaling=scaling,
            rope_interleaved=family.rope_interleaved, eps=eps, attention_bias=bias["qkv"], o_bias=bias["o"],
            mlp_bias=bias["mlp"], qk_norm=family.qk_norm,
            tie_embeddings=f.get("tie_word_embeddings", bool, family.tie_embeddings), byte_vocab=False,
            dtype=weight_dtype)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None


def _rope(doc: Mapping[str, Any], family: Family, problems: list[str]) -> tuple[float, RopeScaling | None]:
    """Rotary theta and scaling from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    key = "rope_parameters" if doc.get("rope_parameters") is not None else "rope_scaling"
    params = doc.get(key) or {}
    if not isinstance(params, dict):
        problems.append(f"field {key!r} is {params!r}, not an object")
        params = {}
    p = _Fields(params, problems, f"{key}.")
    theta = p.get("rope_theta", float) or _Fields(doc, problems).get("rope_theta", float, family.rope_theta)
    factor = params.get("partial_rotary_factor") or doc.get("partial_rotary_factor") or 1.0
    if factor != 1.0:
        problems.append(f"partial_rotary_factor {factor} is not supported (only 1.0)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return theta, None
    if kind != "llama3":
        problems.append(f"{key}: rope_type {kind!r} is not supported (only 'default' and 'llama3')")
        return theta, None
    fields = [p.get(k, float, 1.0, required=True) for k in ("factor", "low_freq_factor", "high_freq_factor")]
    original = p.get("original_max_position_embeddings", int, 1, required=True)
    return theta, RopeScaling(*fields, original)


def _check_sliding_window(f: _Fields, context: int, problems: list[str]) -> None:
    """Baton attends over the whole context: a sliding window is exact only when it covers the context.
    Mistral uses ``sliding_window`` when set; Qwen2/Qwen3 only on ``layer_types`` marked ``sliding_attention``
    (older files: ``use_sliding_window``)."""
    window = f.get("sliding_window", int)
    layer_types = f.get("layer_types", list)
    used = "sliding_attention" in layer_types if layer_types is not None else f.get("use_sliding_window", bool, True)
    if window is not None and used and window < context:
        problems.append(f"sliding_window {window} is shorter than the context {context}, and Baton attends over "
                        f"the whole context: serve at most {window} tokens (max_seq_len={window})")


# ---- weights ----------------------------------------------------------------------------------------------


class Weights(Mapping):
    """The canonical state of a model directory as a read-on-access mapping: ``weights[name]`` reads that one
    tensor (a Paddle tensor in the file's dtype, Linear weights ``[in, out]``), so loading holds one tensor
    (at most three copies of it while converting) beyond the model."""

    def __init__(self, fs, tensors: dict[str, tuple[str, TensorEntry]], transposed: set[str]):
        self.fs, self._tensors, self._transposed = fs, tensors, transposed

    def __getitem__(self, name: str) -> paddle.Tensor:
        path, e = self._tensors[name]
        arr = read_tensor(self.fs, path, e, name in self._transposed)
        if e.dtype == "BF16":  # numpy holds bfloat16 as 16-bit integers; Paddle views int16 as bfloat16
            return paddle.to_tensor(arr.view(np.int16)).view(paddle.bfloat16)
        return paddle.to_tensor(arr)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def read_model_dir(url: str, *, dtype: str | None = None, max_seq_len: int | None = None,
                   storage_options: dict[str, Any] | None = None) -> tuple[ModelConfig, Weights]:
    """``(config, weights)`` of the Hugging Face model directory at ``url``: ``config.json`` and
    ``model.safetensors`` or the shards ``model.safetensors.index.json`` lists. Every header is read and checked
    against the config (names, shapes, float dtypes) before this returns; no tensor data is read yet."""
    config = read_config(url, dtype=dtype, max_seq_len=max_seq_len, storage_options=storage_options)
    fs, tensors, formats = scan(url, storage_options)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # a tied head is the embedding itself
    return config, Weights(fs, tensors, _transposed(tensors, config, formats, url))


def read_config(url: str, *, dtype: str | None = None, max_seq_len: int | None = None,
                storage_options: dict[str, Any] | None = None) -> ModelConfig:
    """The ``ModelConfig`` of the model directory at ``url`` (its ``config.json``), whether or not it holds
    weights: a server whose weights come from snapshots needs only this and the tokenizer."""
    fs, root = open_fs(url, storage_options)
    names = listing(fs, root)
    if CONFIG_FILE not in names:
        raise FileNotFoundError(f"{url}: no {CONFIG_FILE} (found {sorted(names)[:10] or 'nothing'})")
    config_url = fs.unstrip_protocol(join(root, CONFIG_FILE))
    doc = read_json(fs.cat_file(join(root, CONFIG_FILE)), config_url)
    return config_from_hf(doc, dtype=dtype, max_seq_len=max_seq_len, source=config_url,
                          name=root.rstrip("/").rsplit("/", 1)[-1] or None)


def load_model_dir(url: str, **options: Any) -> Decoder:
    """A serving model (eval mode, frozen) holding the model directory's weights; ``options`` as for
    ``read_model_dir``."""
    config, weights = read_model_dir(url, **options)
    return build_model(config, weights)


def _transposed(tensors: Mapping[str, tuple[str, TensorEntry]], config: ModelConfig, formats: set[str | None],
                url: str) -> set[str]:
    """The Linear weights stored ``[out, in]`` (to transpose), after checking every name, shape and dtype."""
    expected = parameter_shapes(config)
    problems = [f"missing tensor {n!r}" for n in expected if n not in tensors]
    problems += [f"unexpected tensor {n!r}" for n in tensors if n not in expected]
    flipped, kept, square = set(), set(), set()
    for name in expected.keys() & tensors.keys():
        want, (_, e) = expected[name], tensors[name]
        if e.dtype not in FLOAT_CODES:
            problems.append(f"tensor {name!r} has dtype {e.dtype}, not one of {', '.join(FLOAT_CODES)}")
        if name.endswith(".weight") and len(want) == 2 and "embed_tokens" not in name:
            if want[0] == want[1] and e.shape == want:
                square.add(name)
                continue
            if e.shape == want:
                kept.add(name)
                continue
            if e.shape == want[::-1]:
                flipped.add(name)
                continue
            problems.append(f"tensor {name!r} has shape {list(e.shape)}, expected {list(want)} ([in, out]) or "
                            f"{list(want[::-1])} ([out, in])")
        elif e.shape != want:
            problems.append(f"tensor {name!r} has shape {list(e.shape)}, expected {list(want)}")
    # The LM head is not a projection: PaddleFormers keeps Hugging Face's [vocab, hidden] for it.
    projections = {n for n in kept | flipped if n != "lm_head.weight"}
    if projections & kept and projections & flipped:
        problems.append(f"projection weights mix layouts: {sorted(projections & kept)[:2]} are [in, out], "
                        f"{sorted(projections & flipped)[:2]} are [out, in]")
    if problems:
        more = f"; … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(f"{url}: the weights do not fit {CONFIG_FILE}: " + "; ".join(problems[:20]) + more)
    hf_layout = bool(projections & flipped) if projections else formats == {"pt"}
    return flipped | (square if hf_layout else set())
