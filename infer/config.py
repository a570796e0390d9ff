"""What a model is: its sizes and architecture features. One frozen config object is validated once (every problem
listed at once) and passed down whole. Named sizes for Baton's own byte-level models are below; a Hugging Face
``config.json`` becomes one of these in ``infer.hf``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")
BYTE_VOCAB = 258  # 256 bytes, BOS and EOS: the smallest vocabulary the built-in byte tokenizer needs


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama 3.1's rotary frequency scaling (``rope_type: "llama3"``): long wavelengths are divided by ``factor``,
    short ones kept, the band between interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int | None = None  # None: hidden // heads (Qwen3 and ERNIE 4.5 set it apart)
    vocab_size: int = 384  # 256 bytes + specials, padded so it splits over 2, 3, 4, 6 or 8 ranks
    max_seq_len: int = 512  # the context served: max_position_embeddings, or less
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_interleaved: bool = False  # ERNIE 4.5 rotates pairs (2i, 2i+1); the others rotate halves (i, i + D/2)
    eps: float = 1e-5  # RMSNorm's epsilon
    attention_bias: bool = False  # q/k/v projections have biases (Qwen2)
    o_bias: bool = False  # the output projection has a bias (Llama's attention_bias, ERNIE's use_bias)
    mlp_bias: bool = False  # gate/up/down have biases (Llama's mlp_bias, ERNIE's use_bias)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rotary (Qwen3)
    tie_embeddings: bool = False  # the LM head is the embedding matrix (no lm_head.weight)
    byte_vocab: bool = True  # served with the built-in byte tokenizer, so the vocabulary must hold its tokens
    dtype: str = "float32"

    def __post_init__(self) -> None:
        problems = []
        if min(self.hidden, self.layers, self.heads, self.kv_heads, self.intermediate, self.vocab_size,
               self.max_seq_len) < 1:
            problems.append("sizes must be positive")
        else:
            if self.head_dim is None and self.hidden % self.heads:
                problems.append(f"hidden {self.hidden} is not a multiple of heads {self.heads} (or give head_dim)")
            elif self.head_dim is None:
                object.__setattr__(self, "head_dim", self.hidden // self.heads)
            if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
                problems.append(f"head_dim {self.head_dim} must be even and positive for rotary embedding")
            if self.heads % self.kv_heads:
                problems.append(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.byte_vocab and self.vocab_size < BYTE_VOCAB:
            problems.append(f"vocab_size {self.vocab_size} cannot hold 256 bytes plus BOS and EOS")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if not (self.eps > 0 and self.rope_theta > 0):
            problems.append(f"eps {self.eps} and rope_theta {self.rope_theta} must be positive")
        s = self.rope_scaling
        if s is not None and not (s.factor > 0 and s.high_freq_factor > s.low_freq_factor > 0
                                  and s.original_max_position_embeddings > 0):
            problems.append(f"rope_scaling {s} needs factor > 0 and high_freq_factor > low_freq_factor > 0")
        if problems:
            raise ValueError(f"model config {self.name!r}: " + "; ".join(problems))

    def num_parameters(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = 2 * self.hidden + 2 * self.hidden * q + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate
        per_layer += (q + 2 * kv) * self.attention_bias + self.hidden * self.o_bias
        per_layer += (2 * self.intermediate + self.hidden) * self.mlp_bias + 2 * self.head_dim * self.qk_norm
        heads = 1 if self.tie_embeddings else 2
        return self.layers * per_layer + heads * self.vocab_size * self.hidden + self.hidden


CONFIGS = {
    "tiny": ModelConfig("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, max_seq_len=256),
    "small": ModelConfig("small", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, max_seq_len=1024),
    "medium": ModelConfig("medium", hidden=2048, layers=6, heads=16, kv_heads=8, intermediate=5632,
                          max_seq_len=2048),  # 1.06 GiB in float32: the flow benchmark's "1 GiB model"
    "1b": ModelConfig("1b", hidden=2048, layers=22, heads=16, kv_heads=8, intermediate=5632, max_seq_len=2048),
}


def get_config(name: str, **overrides) -> ModelConfig:
    """The named config, with fields replaced by ``overrides`` (e.g. ``dtype="bfloat16"``). ``head_dim`` follows
    a new ``hidden`` or ``heads`` unless it is overridden too."""
    try:
        base = CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(CONFIGS)}") from None
    if {"hidden", "heads"} & overrides.keys():
        overrides.setdefault("head_dim", None)
    return dataclasses.replace(base, **overrides)
