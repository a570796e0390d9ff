"""A Llama-style decoder in Paddle whose compute runs through ``kernels``.

Parameter names are the checkpoint's names (``layers.3.attn.q_proj.weight``…), so a trainer's state dict, a
snapshot and this model line up by name with no mapping; ``storage.tp`` splits them across ranks. Linear
weights are ``[in, out]``. Activations are float32 on CPU, whose Paddle build has no bfloat16 matmul, and the
weight dtype on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

import kernels
from infer.config import ModelConfig


def _param(layer: paddle.nn.Layer, shape: list[int], dtype: str) -> paddle.Tensor:
    return layer.create_parameter(shape, dtype=dtype, default_initializer=paddle.nn.initializer.Constant(0.0))


class Linear(paddle.nn.Layer):
    def __init__(self, n_in: int, n_out: int, dtype: str):
        super().__init__()
        self.weight = _param(self, [n_in, n_out], dtype)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.astype(x.dtype)
        return paddle.matmul(x, w)


class RMSNorm(paddle.nn.Layer):
    def __init__(self, size: int, eps: float, dtype: str):
        super().__init__()
        self.eps = eps
        self.weight = _param(self, [size], dtype)

    def forward(self, x: paddle.Tensor, residual: paddle.Tensor | None = None):
        w = self.weight if self.weight.dtype == x.dtype else self.weight.astype(x.dtype)
        return kernels.rms_norm(x, w, self.eps, residual)


@dataclass
class KVCache:
    """Per-layer key/value slots ``[B, max_len, kv_heads, head_dim]``; ``length`` slots are filled."""

    k: list[paddle.Tensor]
    v: list[paddle.Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]


class Attention(paddle.nn.Layer):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        self.q_proj = Linear(c.hidden, c.heads * c.head_dim, c.dtype)
        self.k_proj = Linear(c.hidden, c.kv_heads * c.head_dim, c.dtype)
        self.v_proj = Linear(c.hidden, c.kv_heads * c.head_dim, c.dtype)
        self.o_proj = Linear(c.heads * c.head_dim, c.hidden, c.dtype)

    def forward(self, x, cos, sin, k_cache, v_cache, start: int) -> paddle.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape([b, t, self.heads, self.head_dim])
        k = self.k_proj(x).reshape([b, t, self.kv_heads, self.head_dim])
        v = self.v_proj(x).reshape([b, t, self.kv_heads, self.head_dim])
        if paddle.is_grad_enabled() and not self.q_proj.weight.stop_gradient:
            q, k = kernels.rotary(q, k, cos, sin)  # training: keep the graph
        else:
            kernels.rotary_(q, k, cos, sin)
        scale = self.head_dim**-0.5
        if k_cache is None:
            keys, values = k, v
        else:
            k_cache[:, start : start + t] = k.astype(k_cache.dtype)
            v_cache[:, start : start + t] = v.astype(v_cache.dtype)
            if t == 1:
                out = kernels.decode_attention(q.squeeze(1), k_cache, v_cache, start + 1, scale)
                return self.o_proj(out.astype(x.dtype).reshape([b, 1, -1]))
            keys, values = k_cache[:, : start + t].astype(x.dtype), v_cache[:, : start + t].astype(x.dtype)
        return self.o_proj(self._causal(q, keys, values, start, scale).reshape([b, t, -1]))

    def _causal(self, q, keys, values, start: int, scale: float) -> paddle.Tensor:
        """Prefill attention: query ``i`` (position ``start + i``) sees keys ``0 .. start + i``."""
        t, total = q.shape[1], keys.shape[1]
        group = self.heads // self.kv_heads
        keys = keys.transpose([0, 2, 3, 1]).repeat_interleave(group, axis=1)  # [B, H, D, L]
        values = values.transpose([0, 2, 1, 3]).repeat_interleave(group, axis=1)  # [B, H, L, D]
        scores = paddle.matmul(q.transpose([0, 2, 1, 3]), keys) * scale  # [B, H, T, L]
        allowed = paddle.arange(total)[None, :] <= (paddle.arange(t) + start)[:, None]
        scores = paddle.where(allowed, scores, paddle.full_like(scores, float("-inf")))
        return paddle.matmul(F.softmax(scores, axis=-1), values).transpose([0, 2, 1, 3])


class MLP(paddle.nn.Layer):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden, c.intermediate, c.dtype)
        self.up_proj = Linear(c.hidden, c.intermediate, c.dtype)
        self.down_proj = Linear(c.intermediate, c.hidden, c.dtype)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(paddle.nn.Layer):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_norm = RMSNorm(c.hidden, c.eps, c.dtype)
        self.attn = Attention(c)
        self.post_attn_norm = RMSNorm(c.hidden, c.eps, c.dtype)
        self.mlp = MLP(c)

    def forward(self, hidden, residual, cos, sin, k_cache, v_cache, start: int):
        if residual is None:
            x, residual = self.input_norm(hidden)[0], hidden
        else:
            x, residual = self.input_norm(hidden, residual)
        hidden = self.attn(x, cos, sin, k_cache, v_cache, start)
        x, residual = self.post_attn_norm(hidden, residual)
        return self.mlp(x), residual


class Decoder(paddle.nn.Layer):
    """Token ids ``[B, T]`` in, float32 logits ``[B, T, vocab]`` out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = paddle.nn.Layer()
        self.embed_tokens.weight = _param(self.embed_tokens, [config.vocab_size, config.hidden], config.dtype)
        self.layers = paddle.nn.LayerList([DecoderLayer(config) for _ in range(config.layers)])
        self.norm = RMSNorm(config.hidden, config.eps, config.dtype)
        if not config.tie_embeddings:
            self.lm_head = Linear(config.hidden, config.vocab_size, config.dtype)
        half = config.head_dim // 2
        inv_freq = config.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
        angles = np.arange(config.max_seq_len, dtype=np.float64)[:, None] * inv_freq[None, :]
        self.register_buffer("rope_cos", paddle.to_tensor(np.cos(angles).astype(np.float32)), persistable=False)
        self.register_buffer("rope_sin", paddle.to_tensor(np.sin(angles).astype(np.float32)), persistable=False)

    @property
    def compute_dtype(self) -> str:
        on_gpu = self.embed_tokens.weight.place.is_gpu_place()
        return self.config.dtype if on_gpu else "float32"

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        c = self.config
        shape = [batch, max_len or c.max_seq_len, c.kv_heads, c.head_dim]
        return KVCache([paddle.zeros(shape, c.dtype) for _ in range(c.layers)],
                       [paddle.zeros(shape, c.dtype) for _ in range(c.layers)])

    def forward(self, tokens: paddle.Tensor, cache: KVCache | None = None) -> paddle.Tensor:
        """Runs ``tokens`` at positions ``cache.length …`` (0 without a cache) and advances the cache.
        Differentiable when called with gradients enabled and trainable parameters (see ``trainable``)."""
        t = tokens.shape[1]
        start = cache.length if cache is not None else 0
        limit = min(self.config.max_seq_len, cache.capacity if cache is not None else self.config.max_seq_len)
        if start + t > limit:
            raise ValueError(f"sequence of {start + t} tokens exceeds the model's limit of {limit}")
        hidden = F.embedding(tokens, self.embed_tokens.weight).astype(self.compute_dtype)
        cos, sin = self.rope_cos[start : start + t], self.rope_sin[start : start + t]
        residual = None
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
            hidden, residual = layer(hidden, residual, cos, sin, k_cache, v_cache, start)
        hidden = self.norm(hidden, residual)[0]
        if cache is not None:
            cache.length = start + t
        head = self.embed_tokens.weight.T if self.config.tie_embeddings else self.lm_head.weight
        return paddle.matmul(hidden, head.astype(hidden.dtype)).astype("float32")


def trainable(model: Decoder) -> Decoder:
    """Marks every parameter trainable (models are built frozen, for serving)."""
    model.train()
    for p in model.parameters():
        p.stop_gradient = False
    return model


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 weights for ``config`` from a seeded numpy generator: the same on every machine, no Paddle RNG."""
    rng = np.random.default_rng(seed)
    shapes = {name: p.shape for name, p in _shapes(config).items()}
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = np.ones(shape, np.float32)
        else:
            fan_in = shape[0] if not name.endswith("embed_tokens.weight") else shape[1]
            state[name] = (rng.standard_normal(shape, dtype=np.float32) * fan_in**-0.5).astype(np.float32)
    return state


def _shapes(config: ModelConfig) -> dict[str, paddle.Tensor]:
    with paddle.LazyGuard():
        return dict(Decoder(config).state_dict())


def build_model(config: ModelConfig, state: dict | None = None, seed: int = 0) -> Decoder:
    """A model in eval mode holding ``state`` (cast to the config's dtype) or seeded random weights."""
    model = Decoder(config)
    model.eval()
    for p in model.parameters():
        p.stop_gradient = True
    load_state(model, state if state is not None else random_state_dict(config, seed))
    return model


def load_state(model: Decoder, state: dict) -> None:
    """Writes ``state`` into the model's own parameters, casting through the weight-apply kernel."""
    params = model.state_dict()
    missing, unknown = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unknown:
        raise ValueError(f"state dict does not fit {model.config.name!r}: missing {missing[:5]}, unknown {unknown[:5]}")
    for name, value in state.items():
        src = paddle.to_tensor(value) if isinstance(value, np.ndarray) else value
        if list(src.shape) != list(params[name].shape):
            raise ValueError(f"{name}: shape {list(src.shape)} does not fit {list(params[name].shape)}")
        kernels.cast_copy_(params[name], src)
