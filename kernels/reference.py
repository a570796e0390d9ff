"""Paddle implementations of every kernel: what runs on CPU, and the oracle the Triton kernels are tested against.

Each op computes in float32 and rounds once into the output dtype, which is what the Triton kernels do too,
so the two agree to within one rounding of the output dtype.
"""

from __future__ import annotations

import paddle

# Elements converted per step by cast_copy_: bounds its temporary to 16 MiB of float32 whatever the tensor size.
CAST_CHUNK = 1 << 22


def _f32(x: paddle.Tensor) -> paddle.Tensor:
    return x if x.dtype == paddle.float32 else x.astype(paddle.float32)


def cast_copy_(dst: paddle.Tensor, src: paddle.Tensor) -> paddle.Tensor:
    """Writes ``src`` into ``dst``'s own memory, casting chunk by chunk so no full-size temporary exists."""
    with paddle.no_grad():
        if not dst.is_contiguous():  # a strided view (e.g. a tensor-parallel slice): no flat alias to chunk over
            paddle.assign(src if src.dtype == dst.dtype else src.astype(dst.dtype), output=dst)
            return dst
        flat_dst, flat_src = dst.detach().reshape([-1]), src.detach().reshape([-1])
        if src.dtype == dst.dtype:
            paddle.assign(flat_src, output=flat_dst)
            return dst
        n = flat_dst.shape[0]
        for start in range(0, n, CAST_CHUNK):
            stop = min(start + CAST_CHUNK, n)
            paddle.assign(flat_src[start:stop].astype(dst.dtype), output=flat_dst[start:stop])
    return dst


def rms_norm(
    x: paddle.Tensor, weight: paddle.Tensor, eps: float, residual: paddle.Tensor | None = None
) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """``weight * h / rms(h)`` with ``h = x + residual``; returns the output and ``h`` (the next residual)."""
    h = _f32(x) if residual is None else _f32(x) + _f32(residual)
    out = h * paddle.rsqrt(h.pow(2).mean(axis=-1, keepdim=True) + eps) * _f32(weight)
    return out.astype(x.dtype), (None if residual is None else h.astype(x.dtype))


def rotary(q: paddle.Tensor, k: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor):
    """Rotated copies of q ``[B, T, H, D]`` and k ``[B, T, Hkv, D]`` with cos/sin ``[T, D/2]`` (rotate-half
    form). Differentiable: the training forward uses this one."""
    c, s = _f32(cos)[None, :, None, :], _f32(sin)[None, :, None, :]
    out = []
    for x in (q, k):
        x1, x2 = paddle.chunk(_f32(x), 2, axis=-1)
        out.append(paddle.concat([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype))
    return out[0], out[1]


def rotary_(q: paddle.Tensor, k: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> None:
    """``rotary`` written back into q and k (inference)."""
    with paddle.no_grad():
        for x, rotated in zip((q, k), rotary(q, k, cos, sin)):
            paddle.assign(rotated, output=x)


def swiglu(gate: paddle.Tensor, up: paddle.Tensor) -> paddle.Tensor:
    """``silu(gate) * up``, the gated MLP activation."""
    return (paddle.nn.functional.silu(_f32(gate)) * _f32(up)).astype(gate.dtype)


def decode_attention(
    q: paddle.Tensor, k_cache: paddle.Tensor, v_cache: paddle.Tensor, length: int, scale: float
) -> paddle.Tensor:
    """One new query per sequence, q ``[B, H, D]``, against the first ``length`` cache slots ``[B, S, Hkv, D]``.

    Grouped-query: query head ``h`` reads cache head ``h // (H // Hkv)``.
    """
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    k = _f32(k_cache[:, :length]).transpose([0, 2, 3, 1])  # [B, Hkv, D, L]
    v = _f32(v_cache[:, :length]).transpose([0, 2, 1, 3])  # [B, Hkv, L, D]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, axis=1)
        v = v.repeat_interleave(heads // kv_heads, axis=1)
    scores = paddle.matmul(_f32(q).unsqueeze(2), k) * scale  # [B, H, 1, L]
    out = paddle.matmul(paddle.nn.functional.softmax(scores, axis=-1), v)
    return out.squeeze(2).astype(q.dtype)
