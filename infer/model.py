"""The decoder of Llama, Qwen2, Qwen3, Mistral and ERNIE 4.5 in Paddle, its compute running through ``kernels``.

Parameter names are Hugging Face's (``model.layers.3.self_attn.q_proj.weight``…), so a trainer's state dict, a
snapshot, this model and a ``transformers`` checkpoint line up by name with no mapping; ``storage.tp`` splits
them across ranks. Linear weights are ``[in, out]`` (Paddle's layout: ``infer.hf`` transposes Hugging Face's
``[out, in]`` once, when it reads a checkpoint), so snapshot bytes go straight into live parameters. The
families differ only by config flags: q/k/v biases (Qwen2), q/k RMSNorm per head (Qwen3), interleaved rotary
(ERNIE 4.5), Llama 3 rotary scaling, tied embeddings, ``head_dim``. Activations are float32 on CPU, whose Paddle
build has no bfloat16 matmul, and the weight dtype on GPU.

Every forward works on flattened token rows ``[M, hidden]``, each row carrying its own position, and the
attention of a row depends only on that row's sequence. With GEMMs whose rows do not depend on the row count
(``kernels.gemm``) and row-wise or elementwise ops elsewhere, a row's result is independent of the batch around
it, so on CPU the trainer's full forward (``forward``), a request served alone, and the same request among 63
others give bit-identical logits.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import paddle
import paddle.nn.functional as F

import kernels
from infer.config import ModelConfig


def _param(layer: paddle.nn.Layer, shape: list[int], dtype: str) -> paddle.Tensor:
    return layer.create_parameter(shape, dtype=dtype, default_initializer=paddle.nn.initializer.Constant(0.0))


def _as(w: paddle.Tensor, x: paddle.Tensor) -> paddle.Tensor:
    return w if w.dtype == x.dtype else w.astype(x.dtype)


class Linear(paddle.nn.Layer):
    """``x @ weight + bias`` with ``weight`` ``[in, out]``."""

    def __init__(self, n_in: int, n_out: int, dtype: str, bias: bool = False):
        super().__init__()
        self.weight = _param(self, [n_in, n_out], dtype)
        self.bias = _param(self, [n_out], dtype) if bias else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        y = row_matmul(x, self.weight)
        return y if self.bias is None else y + _as(self.bias, y)  # elementwise: a row's sum needs no other row


# Off only to measure what batch invariance costs (bench/engine_bench.py): replies then depend on the batch.
BATCH_INVARIANT = os.environ.get("BATON_BATCH_INVARIANT", "1") != "0"


def row_matmul(x: paddle.Tensor, w: paddle.Tensor, transpose_y: bool = False) -> paddle.Tensor:
    """``x @ w`` (``x @ w.T`` with ``transpose_y``: a tied head over the ``[vocab, hidden]`` embedding, no
    transposed copy) for rows ``x`` ``[M, in]``. On CPU through ``kernels.gemm``, where a row's result does not
    depend on M (batch invariance)."""
    return kernels.matmul(x, _as(w, x), transpose_y, BATCH_INVARIANT)


class RMSNorm(paddle.nn.Layer):
    def __init__(self, size: int, eps: float, dtype: str):
        super().__init__()
        self.eps = eps
        self.weight = _param(self, [size], dtype)

    def forward(self, x: paddle.Tensor, residual: paddle.Tensor | None = None):
        return kernels.rms_norm(x, _as(self.weight, x), self.eps, residual)


class AttentionContext(Protocol):
    """Where a forward's keys and values live: the sequence itself (``Causal``) or the engine's paged KV cache.
    Called per layer with the rows' q ``[M, H, D]`` and k/v ``[M, Hkv, D]``; returns attention ``[M, H, D]``."""

    def __call__(self, layer: int, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor,
                 scale: float) -> paddle.Tensor: ...


class Attention(paddle.nn.Layer):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        self.q_proj = Linear(c.hidden, c.heads * c.head_dim, c.dtype, c.attention_bias)
        self.k_proj = Linear(c.hidden, c.kv_heads * c.head_dim, c.dtype, c.attention_bias)
        self.v_proj = Linear(c.hidden, c.kv_heads * c.head_dim, c.dtype, c.attention_bias)
        self.o_proj = Linear(c.heads * c.head_dim, c.hidden, c.dtype, c.o_bias)
        self.q_norm = RMSNorm(c.head_dim, c.eps, c.dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.eps, c.dtype) if c.qk_norm else None
        # Interleaved rotary turns each pair (2i, 2i+1) by angle i. Reading the even dims, then the odd ones, makes
        # that the rotate-half form the kernels compute, and q.k is unchanged when q and k are reordered alike.
        if c.rope_interleaved:
            order = np.concatenate([np.arange(0, c.head_dim, 2), np.arange(1, c.head_dim, 2)])
            self.register_buffer("pairs", paddle.to_tensor(order), persistable=False)
        else:
            self.pairs = None

    def forward(self, x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor,
                context: AttentionContext) -> paddle.Tensor:
        m = x.shape[0]
        q, k = self.q_proj(x), self.k_proj(x)
        v = self.v_proj(x).reshape([m, self.kv_heads, self.head_dim])
        if self.q_norm is not None:  # over each head's vector: rows [M * heads, head_dim]
            q = self.q_norm(q.reshape([-1, self.head_dim]))[0]
            k = self.k_norm(k.reshape([-1, self.head_dim]))[0]
        q = q.reshape([1, m, self.heads, self.head_dim])
        k = k.reshape([1, m, self.kv_heads, self.head_dim])
        if self.pairs is not None:
            q, k = paddle.index_select(q, self.pairs, axis=-1), paddle.index_select(k, self.pairs, axis=-1)
        if paddle.is_grad_enabled() and not self.q_proj.weight.stop_gradient:
            q, k = kernels.rotary(q, k, cos, sin)  # training: keep the graph
        else:
            kernels.rotary_(q, k, cos, sin)
        out = context(self.index, q[0], k[0], v, self.head_dim**-0.5)
        return self.o_proj(out.astype(x.dtype).reshape([m, -1]))


class MLP(paddle.nn.Layer):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden, c.intermediate, c.dtype, c.mlp_bias)
        self.up_proj = Linear(c.hidden, c.intermediate, c.dtype, c.mlp_bias)
        self.down_proj = Linear(c.intermediate, c.hidden, c.dtype, c.mlp_bias)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.down_proj(kernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(paddle.nn.Layer):
    def __init__(self, c: ModelConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.eps, c.dtype)
        self.self_attn = Attention(c, index)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.eps, c.dtype)
        self.mlp = MLP(c)

    def forward(self, hidden, residual, cos, sin, context: AttentionContext):
        if residual is None:
            x, residual = self.input_layernorm(hidden)[0], hidden
        else:
            x, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(x, cos, sin, context)
        x, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(x), residual


class Causal:
    """Attention of a ``[B, T]`` batch over itself: token t of a sequence sees its tokens 0..t (the trainer's
    full forward). Rows arrive flattened, ``B * T`` of them."""

    def __init__(self, batch: int, length: int):
        self.batch, self.length = batch, length

    def __call__(self, layer: int, q, k, v, scale: float) -> paddle.Tensor:
        b, t = self.batch, self.length
        out = kernels.causal_attention(*(x.reshape([b, t, *x.shape[1:]]) for x in (q, k, v)), scale)
        return out.reshape([b * t, *q.shape[1:]])


def rope_frequencies(c: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies ``[head_dim / 2]`` in float64, with Llama 3.1's scaling when configured."""
    half = c.head_dim // 2
    inv_freq = c.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
    s = c.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * np.pi / inv_freq
    context = s.original_max_position_embeddings
    smooth = (context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = np.where(wavelen < context / s.high_freq_factor, inv_freq, scaled)  # short wavelengths: kept
    return np.where(wavelen > context / s.low_freq_factor, inv_freq / s.factor, scaled)  # long ones: divided


class Embedding(paddle.nn.Layer):
    def __init__(self, vocab_size: int, hidden: int, dtype: str):
        super().__init__()
        self.weight = _param(self, [vocab_size, hidden], dtype)


class Backbone(paddle.nn.Layer):
    """Embeddings, decoder layers and the final norm: what Hugging Face's checkpoints name ``model.``."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden, config.dtype)
        self.layers = paddle.nn.LayerList([DecoderLayer(config, i) for i in range(config.layers)])
        self.norm = RMSNorm(config.hidden, config.eps, config.dtype)

    def forward(self, tokens: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, context: AttentionContext,
                dtype: str) -> paddle.Tensor:
        hidden = F.embedding(tokens, self.embed_tokens.weight).astype(dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, cos, sin, context)
        return self.norm(hidden, residual)[0]


class Decoder(paddle.nn.Layer):
    """Token ids in, float32 logits out: ``forward`` for whole sequences (training, scoring), ``run`` for the
    engine's mixed rows (prefill chunks and decode tokens of many sequences, over a paged KV cache)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = None if config.tie_embeddings else Linear(config.hidden, config.vocab_size, config.dtype)
        angles = np.arange(config.max_seq_len, dtype=np.float64)[:, None] * rope_frequencies(config)[None, :]
        self.register_buffer("rope_cos", paddle.to_tensor(np.cos(angles).astype(np.float32)), persistable=False)
        self.register_buffer("rope_sin", paddle.to_tensor(np.sin(angles).astype(np.float32)), persistable=False)

    @property
    def place(self):
        """Where the weights live: what the KV cache and every per-step tensor follow (not Paddle's process-wide
        default device, which another model or thread may have changed)."""
        return self.model.embed_tokens.weight.place

    @property
    def on_gpu(self) -> bool:
        return self.place.is_gpu_place()

    @property
    def compute_dtype(self) -> str:
        return self.config.dtype if self.on_gpu else "float32"

    def forward(self, tokens: paddle.Tensor) -> paddle.Tensor:
        """Logits ``[B, T, vocab]`` of every position of ``tokens`` ``[B, T]``, each seeing the tokens before it.
        Differentiable when gradients are enabled and the parameters trainable (see ``trainable``)."""
        b, t = tokens.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's limit of {self.config.max_seq_len}")
        positions = paddle.arange(t, dtype="int64").tile([b])
        return self.run(tokens.reshape([-1]), positions, Causal(b, t)).reshape([b, t, -1])

    def run(self, tokens: paddle.Tensor, positions: paddle.Tensor, context: AttentionContext,
            logit_rows: paddle.Tensor | None = None) -> paddle.Tensor:
        """Float32 logits of ``tokens`` ``[N]`` at ``positions`` ``[N]`` (all rows, or only ``logit_rows``), their
        keys and values stored and attended through ``context``."""
        hidden = self.model(tokens, self.rope_cos[positions], self.rope_sin[positions], context, self.compute_dtype)
        if logit_rows is not None:
            hidden = paddle.gather(hidden, logit_rows)
        if self.lm_head is None:  # tied: the embedding [vocab, hidden] is the head, transposed by the GEMM itself
            logits = row_matmul(hidden, self.model.embed_tokens.weight, transpose_y=True)
        else:
            logits = row_matmul(hidden, self.lm_head.weight)
        return logits.astype("float32")


def token_logprobs(logits: paddle.Tensor, tokens: paddle.Tensor) -> paddle.Tensor:
    """Raw log-probabilities (log-softmax of the float32 logits, before temperature or top-p) of ``tokens``
    under ``logits`` ``[..., vocab]``: what the server returns as ``logprobs`` and what a trainer's loss uses."""
    logp = F.log_softmax(logits, axis=-1)
    return paddle.take_along_axis(logp, tokens.astype("int64").unsqueeze(-1), axis=-1).squeeze(-1)


def trainable(model: Decoder) -> Decoder:
    """Marks every parameter trainable (models are built frozen, for serving)."""
    model.train()
    for p in model.parameters():
        p.stop_gradient = False
    return model


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Float32 weights for ``config`` from a seeded numpy generator: the same on every machine, no Paddle RNG."""
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in parameter_shapes(config).items():
        if name.endswith("norm.weight"):
            state[name] = np.ones(shape, np.float32)
        elif name.endswith(".bias"):
            state[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.1).astype(np.float32)
        else:
            fan_in = shape[0] if not name.endswith("embed_tokens.weight") else shape[1]
            state[name] = (rng.standard_normal(shape, dtype=np.float32) * fan_in**-0.5).astype(np.float32)
    return state


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in the model's order, without allocating the model."""
    with paddle.LazyGuard():
        return {name: tuple(p.shape) for name, p in Decoder(config).state_dict().items()}


def build_model(config: ModelConfig, state: Mapping | None = None, seed: int = 0) -> Decoder:
    """A model in eval mode holding ``state`` (cast to the config's dtype) or seeded random weights."""
    model = Decoder(config)
    model.eval()
    for p in model.parameters():
        p.stop_gradient = True
    load_state(model, state if state is not None else random_state_dict(config, seed))
    return model


def load_state(model: Decoder, state: Mapping) -> None:
    """Writes ``state`` into the model's own parameters, casting through the weight-apply kernel, one tensor at a
    time (``state`` may read each on access, as ``infer.hf.Weights`` does)."""
    params = model.state_dict()
    missing, unknown = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unknown:
        raise ValueError(f"state dict does not fit {model.config.name!r}: missing {missing[:5]}, unknown {unknown[:5]}")
    for name, value in state.items():
        src = paddle.to_tensor(value) if isinstance(value, np.ndarray) else value
        if list(src.shape) != list(params[name].shape):
            raise ValueError(f"{name}: shape {list(src.shape)} does not fit {list(params[name].shape)}")
        kernels.cast_copy_(params[name], src)
