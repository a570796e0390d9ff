"""Paddle implementations of every kernel: the oracle the Triton and CPU kernels are tested against, and what runs
where neither applies (on CPU: everything but attention, which ``kernels.cpu_attention`` computes; on a GPU:
prefill attention).

Each op computes in float32 and rounds once into the output dtype, which is what the Triton kernels do too,
so the two agree to within one rounding of the output dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle

from kernels.sizes import EXP_FLOOR, MAX_ROWS, PAGE  # noqa: F401  (re-exported)

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


def xor_at_(words: paddle.Tensor, index: paddle.Tensor, bits: paddle.Tensor) -> None:
    """``words[index] ^= bits`` in ``words``' own memory (a flat integer view of a tensor; each index once).
    ``index_put_``, not ``scatter_``: this build has no 8- or 16-bit integer scatter on CPU."""
    with paddle.no_grad():
        paddle.index_put_(words, (index,), paddle.bitwise_xor(paddle.gather(words, index), bits))


def _fused_rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float, residual: paddle.Tensor | None):
    """Paddle's fused CPU RMSNorm: one op instead of ten (2-4x faster per call at decode sizes here), and each row's
    result is the same for any number of rows (checked for 1-255 rows in ``tests/test_kernels.py``)."""
    from paddle.incubate.nn.functional import fused_rms_norm

    out, summed = fused_rms_norm(x, weight, None, eps, x.ndim - 1, residual=residual)
    return out, (summed if residual is not None else None)


class _RMSNorm(paddle.autograd.PyLayer):
    """The fused op for training too (it has no CPU gradient kernel): the forward is the very same op, so the
    trainer's logits stay bit-identical to the server's, and the gradient is written out here."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        out, summed = _fused_rms_norm(x, weight, eps, residual)
        ctx.eps, ctx.has_residual = eps, residual is not None
        ctx.save_for_backward(x if summed is None else summed, weight)
        return (out, summed) if summed is not None else out

    @staticmethod
    def backward(ctx, d_out, d_summed=None):
        h, weight = ctx.saved_tensor()
        inv = paddle.rsqrt((h * h).mean(axis=-1, keepdim=True) + ctx.eps)
        n = h * inv
        dn = d_out * weight
        d_h = (dn - n * (dn * n).mean(axis=-1, keepdim=True)) * inv
        if d_summed is not None:
            d_h = d_h + d_summed
        d_weight = (d_out * n).reshape([-1, n.shape[-1]]).sum(axis=0)
        return (d_h, d_weight, d_h) if ctx.has_residual else (d_h, d_weight)


def rms_norm(
    x: paddle.Tensor, weight: paddle.Tensor, eps: float, residual: paddle.Tensor | None = None
) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """``weight * h / rms(h)`` with ``h = x + residual``; returns the output and ``h`` (the next residual).
    Computed in float32 and rounded once into ``x``'s dtype, by one fused op whose rows do not depend on the
    batch around them (batch invariance)."""
    x32, w32 = _f32(x), _f32(weight)
    r32 = None if residual is None else _f32(residual)
    tracked = paddle.is_grad_enabled() and not all(t.stop_gradient for t in (x32, w32, r32) if t is not None)
    if tracked:
        result = _RMSNorm.apply(x32, w32, r32, eps)
        out, summed = result if r32 is not None else (result, None)
    else:
        out, summed = _fused_rms_norm(x32, w32, eps, r32)
    return out.astype(x.dtype), (None if summed is None else summed.astype(x.dtype))


def rotary(q: paddle.Tensor, k: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor):
    """Rotated copies of q ``[B, T, H, D]`` and k ``[B, T, Hkv, D]`` with cos/sin ``[T, D/2]`` (rotate-half form),
    computed on q and k together with cos/sin expanded first: a broadcast over middle axes is many times slower
    here than same-shape math. Differentiable: the training forward uses this one."""
    heads = q.shape[2]
    x = paddle.concat([_f32(q), _f32(k)], axis=2)
    cos, sin = (_f32(t)[None, :, None, :].expand([*x.shape[:3], t.shape[-1]]) for t in (cos, sin))
    x1, x2 = paddle.chunk(x, 2, axis=-1)
    out = paddle.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out[:, :, :heads].astype(q.dtype), out[:, :, heads:].astype(k.dtype)


def rotary_(q: paddle.Tensor, k: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> None:
    """``rotary`` written back into q and k (inference)."""
    with paddle.no_grad():
        for x, rotated in zip((q, k), rotary(q, k, cos, sin)):
            paddle.assign(rotated, output=x)


def swiglu(gate: paddle.Tensor, up: paddle.Tensor) -> paddle.Tensor:
    """``silu(gate) * up``, the gated MLP activation."""
    return (paddle.nn.functional.silu(_f32(gate)) * _f32(up)).astype(gate.dtype)


def attend(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, bias: paddle.Tensor, keep: paddle.Tensor,
           scale: float) -> paddle.Tensor:
    """Attention in Paddle ops: q ``[Hkv, G, R, D]`` (R query rows per group g), k/v ``[Hkv, G, L, D]``, the mask
    as ``bias`` ``[Hkv, G, R, L]`` (0 where a row may see a key, -inf where not) and ``keep`` (1 and 0) -> float32
    ``[Hkv, G, R, D]``. Masked weights are made 0 by ``keep``, not by ``exp(-inf)``, which this build's CPU ``exp``
    returns as a denormal."""
    s = paddle.matmul(_f32(q) * scale, _f32(k), transpose_y=True) + bias
    p = paddle.exp(paddle.clip(s - s.max(axis=-1, keepdim=True), min=EXP_FLOOR)) * keep
    return paddle.matmul(p, _f32(v)) / p.sum(axis=-1, keepdim=True)


@dataclass(frozen=True)
class Plan:
    """What attention needs that is the same in every layer of a forward, built once per step: G sequences with
    T queries each; query (g, t) sits at ``positions[g, t]`` and sees that sequence's keys 0..position, listed
    for a paged cache by ``table`` ``[G, nb]``. The masks and indices of the Paddle path are made on first use
    (the CPU kernel needs none of them)."""

    positions: np.ndarray  # [G, T] int64
    heads: int
    kv_heads: int
    length: int  # keys per sequence, a multiple of PAGE
    table: np.ndarray | None = None  # [G, nb] int64
    pages: int = 0  # pages in the pool
    place: Any = None  # where the attention's tensors live: its masks and indices are made there

    @staticmethod
    def build(positions: np.ndarray, heads: int, kv_heads: int, length: int, page_table: np.ndarray | None = None,
              pages: int = 0, *, place: Any) -> Plan:
        table = None if page_table is None else np.ascontiguousarray(page_table, np.int64)
        return Plan(np.ascontiguousarray(positions, np.int64), heads, kv_heads, length, table, pages, place)

    def _tensor(self, values: np.ndarray) -> paddle.Tensor:
        """``values`` on the plan's place, whatever Paddle's process-wide default device is."""
        return paddle.to_tensor(values, place=self.place)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @functools.cached_property
    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Per query row (g, t) in order: its sequence g and its position."""
        count, t = self.positions.shape
        return np.repeat(np.arange(count, dtype=np.int64), t), self.positions.reshape(-1)

    @functools.cached_property
    def _seen(self) -> np.ndarray:  # [Hkv, G, R, L]: row (t, head in group) may see the key
        pos = np.repeat(self.positions, self.group, axis=1)
        seen = np.arange(self.length)[None, None, :] <= pos[:, :, None]
        return np.ascontiguousarray(np.broadcast_to(seen, (self.kv_heads, *seen.shape)))

    @functools.cached_property
    def bias(self) -> paddle.Tensor:  # full-size, not broadcast: a broadcasting add is ~40x slower here
        return self._tensor(np.where(self._seen, np.float32(0), np.float32(-np.inf)))

    @functools.cached_property
    def keep(self) -> paddle.Tensor:
        return self._tensor(self._seen.astype(np.float32))

    @functools.cached_property
    def page_table(self) -> paddle.Tensor:
        return self._tensor(self.table)

    @functools.cached_property
    def lengths(self) -> paddle.Tensor:  # last position + 1: the decode kernel's view
        return self._tensor(self.positions[:, -1] + 1)

    @functools.cached_property
    def index(self) -> paddle.Tensor:  # rows of the pages viewed as [Hkv * N, PAGE * D]
        heads = np.arange(self.kv_heads, dtype=np.int64)[:, None, None]
        return self._tensor((heads * self.pages + self.table[None]).reshape(-1))


def _query_rows(q: paddle.Tensor, plan: Plan) -> paddle.Tensor:
    """q ``[G, T, H, D]`` as ``[Hkv, G, R, D]`` rows (t, head in group)."""
    g_count, t, heads, dim = q.shape
    kv = plan.kv_heads
    return q.reshape([g_count, t, kv, heads // kv, dim]).transpose([2, 0, 1, 3, 4]).reshape([kv, g_count, -1, dim])


def _from_rows(out: paddle.Tensor, q_shape: list[int]) -> paddle.Tensor:
    """``[Hkv, G, R, D]`` attention rows back to ``[G, T, H, D]``."""
    g_count, t, heads, dim = q_shape
    kv = out.shape[0]
    out = out.reshape([kv, g_count, t, heads // kv, dim])
    return out.transpose([1, 2, 0, 3, 4]).reshape([g_count, t, heads, dim])


def causal_attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, scale: float) -> paddle.Tensor:
    """Training/full-sequence attention: q ``[B, T, H, D]``, k/v ``[B, T, Hkv, D]``; token t sees tokens 0..t.
    Differentiable."""
    batch, t, heads, dim = q.shape
    kv_heads = k.shape[2]
    length = -(-t // PAGE) * PAGE
    keys, values = (_f32(x).transpose([2, 0, 1, 3]) for x in (k, v))  # [Hkv, B, T, D]
    if length > t:
        pad = paddle.zeros([kv_heads, batch, length - t, dim], "float32")
        keys, values = paddle.concat([keys, pad], 2), paddle.concat([values, pad], 2)
    plan = Plan.build(np.tile(np.arange(t), (batch, 1)), heads, kv_heads, length, place=q.place)
    out = attend(_query_rows(q, plan), keys, values, plan.bias, plan.keep, scale)
    return _from_rows(out, list(q.shape)).astype(q.dtype)


def store_kv(k_pages: paddle.Tensor, v_pages: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor,
             slots: np.ndarray) -> None:
    """Writes rows k/v ``[M, Hkv, D]`` into pages ``[Hkv, N, PAGE, D]`` at token slots ``slots`` ``[M]``
    (page * PAGE + offset)."""
    kv_heads, count, page, dim = k_pages.shape
    offsets = np.arange(kv_heads, dtype=np.int64) * count * page
    index = paddle.to_tensor((slots.astype(np.int64)[:, None] + offsets[None, :]).reshape(-1), place=k_pages.place)
    for pages, new in ((k_pages, k), (v_pages, v)):
        flat = pages.reshape([-1, dim])
        paddle.scatter_(flat, index, new.astype(flat.dtype).reshape([-1, dim]), overwrite=True)


def gather_pages(pages: paddle.Tensor, plan: Plan) -> paddle.Tensor:
    """Pages ``[Hkv, N, PAGE, D]`` of the plan's sequences as contiguous keys ``[Hkv, G, nb*PAGE, D]``."""
    kv_heads, count, page, dim = pages.shape
    flat = pages.reshape([kv_heads * count, page * dim])
    if flat.dtype == paddle.float16:  # no float16 gather on CPU: move the same bits as int16
        gathered = paddle.gather(flat.view(paddle.int16), plan.index).view(paddle.float16)
    else:
        gathered = paddle.gather(flat, plan.index)
    return gathered.reshape([kv_heads, plan.positions.shape[0], plan.length, dim])


def paged_attention(q: paddle.Tensor, k_pages: paddle.Tensor, v_pages: paddle.Tensor, plan: Plan,
                    scale: float) -> paddle.Tensor:
    """Attention over a paged KV cache: q ``[G, T, H, D]`` of the plan's G sequences, pages ``[Hkv, N, PAGE, D]``."""
    keys, values = gather_pages(k_pages, plan), gather_pages(v_pages, plan)
    out = attend(_query_rows(q, plan), keys, values, plan.bias, plan.keep, scale)
    return _from_rows(out, list(q.shape)).astype(q.dtype)


def decode_plan(page_table: np.ndarray, lengths: np.ndarray, heads: int, kv_heads: int, pages: int,
                place: Any) -> Plan:
    """The plan of one new query per sequence at ``lengths - 1``, over that sequence's pages."""
    return Plan.build((lengths.astype(np.int64) - 1)[:, None], heads, kv_heads, page_table.shape[1] * PAGE,
                      page_table, pages, place=place)


def decode_attention(q: paddle.Tensor, k_pages: paddle.Tensor, v_pages: paddle.Tensor, page_table: paddle.Tensor,
                     lengths: paddle.Tensor, scale: float) -> paddle.Tensor:
    """One new query per sequence, q ``[B, H, D]``, against the first ``lengths[b]`` keys of its pages
    (``[Hkv, N, PAGE, D]``, table ``[B, nb]``). Grouped-query: query head h reads kv head ``h // (H // Hkv)``."""
    plan = decode_plan(page_table.numpy(), lengths.numpy(), q.shape[1], k_pages.shape[0], k_pages.shape[1],
                       k_pages.place)
    return paged_attention(q.unsqueeze(1), k_pages, v_pages, plan, scale).squeeze(1)
