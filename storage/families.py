"""The decoder families Baton knows, and the canonical tensors a Hugging Face ``config.json`` implies.

Both the server (``infer.hf`` builds its model from the same table) and the exports to other engines (which must
check a version against the model a server runs before touching it) need to know, from a config alone, which
tensors a model has and their shapes. Canonical is Hugging Face's names with Paddle's ``Linear`` layout
``[in, out]``; ``infer.model.Decoder`` holds exactly these parameters (a test pins that).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import IncompatibleTargetError


@dataclass(frozen=True)
class Family:
    """What one ``architectures`` entry means beyond the common fields."""

    model_type: str
    rope_theta: float  # transformers' default when config.json has none
    tie_embeddings: bool  # likewise
    qkv_bias: str | bool  # the field that turns q/k/v biases on, or a constant
    o_bias: str | bool
    mlp_bias: str | bool
    qk_norm: bool = False
    rope_interleaved: bool = False

    def flag(self, doc: Mapping[str, Any], which: str) -> bool:
        """Whether ``doc`` turns on the ``which`` bias (``qkv``, ``o`` or ``mlp``) of this family."""
        field = getattr(self, f"{which}_bias")
        return bool(doc.get(field, False)) if isinstance(field, str) else field


FAMILIES = {
    "LlamaForCausalLM": Family("llama", 10000.0, False, "attention_bias", "attention_bias", "mlp_bias"),
    "MistralForCausalLM": Family("mistral", 10000.0, False, False, False, False),
    "Qwen2ForCausalLM": Family("qwen2", 10000.0, False, True, False, False),
    "Qwen3ForCausalLM": Family("qwen3", 10000.0, False, "attention_bias", "attention_bias", False, qk_norm=True),
    "Ernie4_5ForCausalLM": Family("ernie4_5", 500000.0, True, "use_bias", "use_bias", "use_bias",
                                  rope_interleaved=True),
}


@dataclass(frozen=True)
class Sizes:
    """The sizes of a decoder read from its ``config.json``: all the exports need."""

    architecture: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype: str | None  # ``dtype`` / ``torch_dtype`` of the file, None when it says none
    source: str

    def describe(self) -> str:
        return (f"{self.architecture}: {self.layers} layers, hidden {self.hidden}, {self.heads} heads "
                f"({self.kv_heads} kv) of {self.head_dim}, intermediate {self.intermediate}, vocab {self.vocab}, "
                f"{'tied' if self.tied else 'untied'} embeddings ({self.source})")


def sizes_of(doc: Mapping[str, Any], source: str) -> Sizes:
    """The sizes of the decoder ``doc`` describes; a missing or malformed field is a ``ValueError`` naming
    ``source`` and the field."""
    archs = doc.get("architectures")
    if not isinstance(archs, list) or not archs or archs[0] not in FAMILIES:
        raise ValueError(f"{source}: architectures {archs!r} is not one Baton knows ({', '.join(FAMILIES)})")
    family = FAMILIES[archs[0]]
    bad = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
           if not isinstance(doc.get(k), int) or doc[k] < 1]
    if bad:
        raise ValueError(f"{source}: fields {bad} must be positive integers")
    heads = doc["num_attention_heads"]
    head_dim = doc.get("head_dim") or doc["hidden_size"] // heads
    dtype = doc.get("dtype") or doc.get("torch_dtype")
    return Sizes(archs[0], doc["hidden_size"], doc["num_hidden_layers"], heads,
                 doc.get("num_key_value_heads") or heads, head_dim, doc["intermediate_size"], doc["vocab_size"],
                 bool(doc.get("tie_word_embeddings", family.tie_embeddings)), dtype, source)


def canonical_shapes(doc: Mapping[str, Any], source: str) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of the model ``doc`` describes, with its shape, in the model's order."""
    s = sizes_of(doc, source)
    family = FAMILIES[s.architecture]
    h, q, kv, i = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s.vocab, h)}
    on = {None: True, "qkv": family.flag(doc, "qkv"), "o": family.flag(doc, "o"), "mlp": family.flag(doc, "mlp"),
          "qk_norm": family.qk_norm}
    layer = (("input_layernorm.weight", (h,), None),
             ("self_attn.q_proj.weight", (h, q), None), ("self_attn.q_proj.bias", (q,), "qkv"),
             ("self_attn.k_proj.weight", (h, kv), None), ("self_attn.k_proj.bias", (kv,), "qkv"),
             ("self_attn.v_proj.weight", (h, kv), None), ("self_attn.v_proj.bias", (kv,), "qkv"),
             ("self_attn.o_proj.weight", (q, h), None), ("self_attn.o_proj.bias", (h,), "o"),
             ("self_attn.q_norm.weight", (s.head_dim,), "qk_norm"),
             ("self_attn.k_norm.weight", (s.head_dim,), "qk_norm"),
             ("post_attention_layernorm.weight", (h,), None),
             ("mlp.gate_proj.weight", (h, i), None), ("mlp.gate_proj.bias", (i,), "mlp"),
             ("mlp.up_proj.weight", (h, i), None), ("mlp.up_proj.bias", (i,), "mlp"),
             ("mlp.down_proj.weight", (i, h), None), ("mlp.down_proj.bias", (h,), "mlp"))
    for n in range(s.layers):
        shapes.update((f"model.layers.{n}.{name}", shape) for name, shape, when in layer if on[when])
    shapes["model.norm.weight"] = (h,)
    if not s.tied:
        shapes["lm_head.weight"] = (h, s.vocab)
    return shapes


def _names(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" … ({len(names)} in all)" if len(names) > limit else "")


def _layers(names) -> int:
    return 1 + max((int(n.split(".")[2]) for n in names if n.startswith("model.layers.")), default=-1)


SERVER_ADVICE = "Publish a version of that model, or point the server's entry at the config.json of the model it runs"


def check_model_fits(tensors: Mapping[str, tuple[str, tuple[int, ...]]], doc: Mapping[str, Any], source: str, what: str,
               dtype: str | None = None, target: str = "the server's model", advice: str = SERVER_ADVICE) -> Sizes:
    """Refuses (``IncompatibleTargetError``) a version whose canonical tensors (name -> (dtype code, shape)) are
    not exactly the model ``doc`` describes: every tensor missing, extra or of another shape is named, and with
    ``dtype`` (a code such as ``BF16``) every tensor of another dtype. ``what`` names the version in the message,
    ``target`` the model and ``advice`` the fix. Returns the model's sizes."""
    sizes = sizes_of(doc, source)
    want = canonical_shapes(doc, source)
    problems = []
    missing = [n for n in want if n not in tensors]
    extra = sorted(n for n in tensors if n not in want)
    if missing:
        problems.append(f"missing {_names(missing)}")
    if extra:
        problems.append(f"not in {target}: {_names(extra)}")
    if _layers(tensors) != sizes.layers:
        problems.append(f"the version has {_layers(tensors)} layers, {target} {sizes.layers}")
    shaped = [f"{n} {list(tensors[n][1])} (expected {list(s)})" for n, s in want.items()
              if n in tensors and tuple(tensors[n][1]) != s]
    if shaped:
        problems.append(f"other shapes: {_names(shaped, 4)}")
    typed = sorted(n for n in want if n in tensors and dtype and tensors[n][0] != dtype)
    if typed:
        problems.append(f"dtype {tensors[typed[0]][0]} where {target} holds {dtype}: {_names(typed, 3)}")
    if problems:
        raise IncompatibleTargetError(f"{what} does not fit {target} ({sizes.describe()}): " + "; ".join(problems)
                                      + f". {advice}")
    return sizes
