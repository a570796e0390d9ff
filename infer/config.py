"""Named model sizes. One frozen config object is validated once and passed down whole."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab_size: int = 384  # 256 bytes + specials, padded so it splits over 2, 3, 4, 6 or 8 ranks
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        problems = []
        if self.hidden % self.heads:
            problems.append(f"hidden {self.hidden} is not a multiple of heads {self.heads}")
        elif (self.hidden // self.heads) % 2:
            problems.append(f"head size {self.hidden // self.heads} must be even for rotary embedding")
        if self.heads % self.kv_heads:
            problems.append(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.vocab_size < 258:
            problems.append(f"vocab_size {self.vocab_size} cannot hold 256 bytes plus BOS and EOS")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if min(self.hidden, self.layers, self.heads, self.kv_heads, self.intermediate, self.max_seq_len) < 1:
            problems.append("sizes must be positive")
        if problems:
            raise ValueError(f"model config {self.name!r}: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def num_parameters(self) -> int:
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * self.hidden + 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        per_layer += 3 * self.hidden * self.intermediate
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
    """The named config, with fields replaced by ``overrides`` (e.g. ``dtype="bfloat16"``)."""
    try:
        base = CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(CONFIGS)}") from None
    return dataclasses.replace(base, **overrides)
