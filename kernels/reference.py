"""Paddle implementations of every kernel: what runs on CPU, and the oracle the Triton kernels are tested against.

Each op computes in float32 and rounds once into the output dtype, which is what the Triton kernels do too,
so the two agree to within one rounding of the output dtype.
"""

from __future__ import annotations

import paddle

# Elements converted per step by cast_copy_: bounds its temporary to 16 MiB of float32 whatever the tensor size.
CAST_CHUNK = 1 << 22
# Batch invariance on Paddle's CPU build (measured): a GEMM with fewer rows than MIN_ROWS, or (for inner sizes
# from about 1024) 192 rows or more, takes another code path and rounds differently; elementwise kernels round
# their last few elements (a scalar tail shorter than LANES) differently from the rest. Callers pad rows to a
# multiple of MIN_ROWS and run GEMMs in blocks of at most MAX_ROWS; shapes are kept multiples of LANES.
MIN_ROWS = 8
MAX_ROWS = 128
LANES = 16
# KV-cache page size in tokens; attention pads key lengths to a multiple of it.
PAGE = 16


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
    """``weight * h / rms(h)`` with ``h = x + residual``; returns the output and ``h`` (the next residual).

    A row's result does not depend on how many rows come with it (batch invariance): ``h * h`` instead of
    ``pow`` and the reciprocal root taken over ``LANES`` copies of each row's mean, because Paddle's CPU kernels
    compute the last few elements of a tensor in a scalar tail that rounds differently from the vector body.
    """
    h = _f32(x) if residual is None else _f32(x) + _f32(residual)
    mean = (h * h).mean(axis=-1, keepdim=True) + eps
    inv = paddle.rsqrt(mean.expand([*mean.shape[:-1], LANES]))[..., :1]
    out = h * inv * _f32(weight)
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


def attend(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, allowed: paddle.Tensor, scale: float) -> paddle.Tensor:
    """The attention every path shares: q ``[Hkv, G, R, D]`` (R query rows per group g), k/v ``[Hkv, G, L, D]``,
    ``allowed`` ``[G, R, L]`` -> float32 ``[Hkv, G, R, D]``.

    Written so that a query row's result depends only on its own query and its allowed keys, not on R, L or G:
    both GEMMs have at least ``MIN_ROWS`` rows (padded by the callers), keys past a row's position weigh exactly 0
    (trailing zeros change no sum here), and ``L`` is a multiple of ``PAGE`` (no scalar tail in ``exp``). That is
    what makes a served token's logprob bit-identical to the trainer's full forward and to the same request run
    alone (see ``infer.model``).
    """
    s = paddle.matmul(_f32(q) * scale, _f32(k), transpose_y=True)  # [Hkv, G, R, L]
    s = paddle.where(allowed.unsqueeze(0), s, paddle.full([1], float("-inf"), s.dtype))
    p = paddle.exp(s - s.max(axis=-1, keepdim=True))
    return paddle.matmul(p, _f32(v)) / p.sum(axis=-1, keepdim=True)


def _query_rows(q: paddle.Tensor, kv_heads: int) -> tuple[paddle.Tensor, int]:
    """q ``[G, T, H, D]`` as ``[Hkv, G, R, D]`` rows (t, head in group), padded with zero rows to ``MIN_ROWS``."""
    g_count, t, heads, dim = q.shape
    group = heads // kv_heads
    rows = q.reshape([g_count, t, kv_heads, group, dim]).transpose([2, 0, 1, 3, 4]).reshape([kv_heads, g_count,
                                                                                              t * group, dim])
    if t * group < MIN_ROWS:
        rows = paddle.concat([rows, paddle.zeros([kv_heads, g_count, MIN_ROWS - t * group, dim], rows.dtype)], 2)
    return rows, t * group


def _from_rows(out: paddle.Tensor, real: int, t: int, heads: int) -> paddle.Tensor:
    """``[Hkv, G, R, D]`` attention rows back to ``[G, T, H, D]``."""
    kv_heads, g_count, _, dim = out.shape
    out = out[:, :, :real].reshape([kv_heads, g_count, t, heads // kv_heads, dim])
    return out.transpose([1, 2, 0, 3, 4]).reshape([g_count, t, heads, dim])


def _allowed(positions: paddle.Tensor, group: int, rows: int, length: int) -> paddle.Tensor:
    """``[G, rows, L]``: row (t, j) of group g sees keys ``0 .. positions[g, t]``; padding rows copy the last."""
    pos = positions.astype("int64").repeat_interleave(group, axis=1)  # [G, T*group]
    if pos.shape[1] < rows:
        pos = paddle.concat([pos, pos[:, -1:].expand([pos.shape[0], rows - pos.shape[1]])], axis=1)
    return paddle.arange(length, dtype="int64").reshape([1, 1, length]) <= pos.unsqueeze(-1)


def causal_attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, scale: float) -> paddle.Tensor:
    """Training/full-sequence attention: q ``[B, T, H, D]``, k/v ``[B, T, Hkv, D]``; token t sees tokens 0..t.
    Differentiable. Bit-identical per row to ``paged_attention`` over the same keys."""
    batch, t, heads, dim = q.shape
    kv_heads = k.shape[2]
    length = -(-t // PAGE) * PAGE
    keys, values = (_f32(x).transpose([2, 0, 1, 3]) for x in (k, v))  # [Hkv, B, T, D]
    if length > t:
        pad = paddle.zeros([kv_heads, batch, length - t, dim], "float32")
        keys, values = paddle.concat([keys, pad], 2), paddle.concat([values, pad], 2)
    rows, real = _query_rows(q, kv_heads)
    positions = paddle.arange(t, dtype="int64").unsqueeze(0).expand([batch, t])
    out = attend(rows, keys, values, _allowed(positions, heads // kv_heads, rows.shape[2], length), scale)
    return _from_rows(out, real, t, heads).astype(q.dtype)


def gather_pages(pages: paddle.Tensor, page_table: paddle.Tensor) -> paddle.Tensor:
    """Pages ``[Hkv, N, PAGE, D]`` of each sequence's table ``[G, nb]`` as contiguous keys ``[Hkv, G, nb*PAGE, D]``."""
    kv_heads, count, page, dim = pages.shape
    g_count, blocks = page_table.shape
    index = (paddle.arange(kv_heads, dtype="int64").reshape([-1, 1, 1]) * count
             + page_table.astype("int64").unsqueeze(0)).reshape([-1])
    flat = pages.reshape([kv_heads * count, page * dim])
    if flat.dtype == paddle.float16:  # no float16 gather on CPU: move the same bits as int16
        gathered = paddle.gather(flat.view(paddle.int16), index).view(paddle.float16)
    else:
        gathered = paddle.gather(flat, index)
    return gathered.reshape([kv_heads, g_count, blocks * page, dim])


def paged_attention(q: paddle.Tensor, k_pages: paddle.Tensor, v_pages: paddle.Tensor, page_table: paddle.Tensor,
                    positions: paddle.Tensor, scale: float) -> paddle.Tensor:
    """Attention over a paged KV cache: q ``[G, T, H, D]`` of G sequences, pages ``[Hkv, N, PAGE, D]``, each
    sequence's pages in ``page_table`` ``[G, nb]``; query (g, t) sees that sequence's keys 0..positions[g, t]."""
    g_count, t, heads, _ = q.shape
    kv_heads = k_pages.shape[0]
    keys, values = gather_pages(k_pages, page_table), gather_pages(v_pages, page_table)
    rows, real = _query_rows(q, kv_heads)
    allowed = _allowed(positions, heads // kv_heads, rows.shape[2], keys.shape[2])
    return _from_rows(attend(rows, keys, values, allowed, scale), real, t, heads).astype(q.dtype)


def decode_attention(q: paddle.Tensor, k_pages: paddle.Tensor, v_pages: paddle.Tensor, page_table: paddle.Tensor,
                     lengths: paddle.Tensor, scale: float) -> paddle.Tensor:
    """One new query per sequence, q ``[B, H, D]``, against the first ``lengths[b]`` keys of its pages
    (``[Hkv, N, PAGE, D]``, table ``[B, nb]``). Grouped-query: query head h reads kv head ``h // (H // Hkv)``."""
    positions = (lengths.astype("int64") - 1).unsqueeze(1)
    return paged_attention(q.unsqueeze(1), k_pages, v_pages, page_table, positions, scale).squeeze(1)
