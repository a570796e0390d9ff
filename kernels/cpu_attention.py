"""Attention on CPU: one compiled loop (numba) that reads each query's keys and values straight from the KV pages;
and the rotary embedding of its q and k, compiled too.

Why: attention in Paddle ops has to gather every sequence's pages into a padded copy, build masks and run a dozen
ops a layer, each a pass over ``[Hkv, G, rows, keys]`` scores. Here a query row visits its own keys only, in place
(what that saves per step: ``bench/engine_bench.py``).

Why a row's bits depend on nothing else: every query row runs the same loops in the same order whatever rows,
sequences or padding come with it. A score sums over the head dims in order (the SIMD lanes are a page's 16
keys, each lane its own sum), the softmax and the weighted values sum over keys in order (there the lanes are
head dims), and numba compiles without fast-math, so nothing is reordered or fused one way here and another
there. The trainer's forward (``causal``) runs the same loops over its own keys laid out as pages, so its
logits are the server's bit for bit (``tests/test_kernels.py``, ``tests/test_engine.py``).

Keys are stored transposed within a page, ``[Hkv, N, D, PAGE]``: the score loop then reads 16 keys' dim ``d``
as one contiguous vector. Values stay ``[Hkv, N, PAGE, D]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("NUMBA_DISABLE_INTEL_SVML", "1")  # one scalar exp everywhere: no vector/tail difference
os.environ.setdefault("NUMBA_SLP_VECTORIZE", "1")  # a page's 16 score lanes are straight-line code: SLP packs them

import numba  # noqa: E402
import numpy as np  # noqa: E402
import paddle  # noqa: E402

from kernels import sizes  # noqa: E402
from kernels.sizes import PAGE  # noqa: E402

EXP_FLOOR32 = np.float32(sizes.EXP_FLOOR)  # sizes.EXP_FLOOR as a float32 constant inside the compiled loops


# Both loops run in parallel over (row, head): numba's parallel loops also tell LLVM that the arrays do not
# overlap, which is what lets it put a page's 16 key lanes (scores) and the head dims (values) in SIMD registers.
@numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _scores(q, k_pages, table, seq_of, positions, scale, scores):  # pragma: no cover - compiled
    """``scores[r, h, j]`` = (q[r, h] * scale) . key j of row r's sequence, for its keys 0..positions[r]
    (the rest of the last page too; never read)."""
    rows, heads, dim = q.shape
    group = heads // k_pages.shape[0]
    for item in numba.prange(rows * heads):
        r, h = item // heads, item % heads
        kv, seq = h // group, seq_of[r]
        for b in range((positions[r] + PAGE) // PAGE):
            page = table[seq, b]
            lanes = np.zeros(PAGE, np.float32)
            for d in range(dim):
                x = q[r, h, d] * scale
                for lane in range(PAGE):
                    lanes[lane] += x * k_pages[kv, page, d, lane]
            for lane in range(PAGE):
                scores[r, h, b * PAGE + lane] = lanes[lane]


@numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _softmax_values(scores, v_pages, table, seq_of, positions, out):  # pragma: no cover - compiled
    rows, heads, dim = out.shape
    group = heads // v_pages.shape[0]
    for item in numba.prange(rows * heads):
        r, h = item // heads, item % heads
        kv, seq, count = h // group, seq_of[r], positions[r] + 1
        top = scores[r, h, 0]
        for j in range(1, count):
            top = max(top, scores[r, h, j])
        total = np.float32(0)
        acc = np.zeros(dim, np.float32)
        for j in range(count):
            w = np.exp(max(scores[r, h, j] - top, EXP_FLOOR32))
            total += w
            page, slot = table[seq, j // PAGE], j % PAGE
            for d in range(dim):
                acc[d] += w * v_pages[kv, page, slot, d]
        for d in range(dim):
            out[r, h, d] = acc[d] / total


def _attend(q, k_pages, v_pages, table, seq_of, positions, scale, out) -> None:
    """q ``[R, H, D]``: row r belongs to sequence ``seq_of[r]`` (its pages: ``table[seq_of[r]]``) and sits at
    ``positions[r]``; it sees that sequence's keys 0..position. Writes ``out`` ``[R, H, D]``."""
    scores = np.empty((*q.shape[:2], table.shape[1] * PAGE), np.float32)
    _scores(q, k_pages, table, seq_of, positions, np.float32(scale), scores)
    _softmax_values(scores, v_pages, table, seq_of, positions, out)


@numba.njit(cache=True, nogil=True)
def _store(k_pages, v_pages, k, v, slots):  # pragma: no cover - compiled
    for r in range(slots.shape[0]):
        page, slot = slots[r] // PAGE, slots[r] % PAGE
        for h in range(k.shape[1]):
            for d in range(k.shape[2]):
                k_pages[h, page, d, slot] = k[r, h, d]
                v_pages[h, page, slot, d] = v[r, h, d]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _rotate(x, cos, sin):  # pragma: no cover - compiled
    """x ``[B, T, H, D]`` in place, rotate-half form, with cos/sin ``[T, D/2]``: the multiplies and the add or
    subtract of ``reference.rotary``, each rounded as Paddle rounds it (no fused multiply-add without fast-math),
    so the trainer's rotated q and k are these bits."""
    half = x.shape[3] // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for h in range(x.shape[2]):
                for i in range(half):
                    x1, x2 = x[b, t, h, i], x[b, t, h, half + i]
                    x[b, t, h, i] = x1 * cos[t, i] - x2 * sin[t, i]
                    x[b, t, h, half + i] = x2 * cos[t, i] + x1 * sin[t, i]


def _np(t: paddle.Tensor) -> np.ndarray:
    return np.from_dlpack(t.detach()) if t.is_contiguous() else t.numpy()


def supports(*xs: paddle.Tensor) -> bool:
    """Tensors this module computes on: float32 on the CPU."""
    return all(x.place.is_cpu_place() and x.dtype == paddle.float32 for x in xs)


def rotary_(q: paddle.Tensor, k: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> None:
    """Rotates contiguous q ``[B, T, H, D]`` and k ``[B, T, Hkv, D]`` in place (cos/sin ``[T, D/2]``): one compiled
    call instead of numpy's four temporaries and a concatenate a layer."""
    c, s = _np(cos), _np(sin)
    _rotate(_np(q), c, s)
    _rotate(_np(k), c, s)


def new_pages(kv_heads: int, pages: int, dim: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Zeroed key pages ``[Hkv, N, D, PAGE]`` and value pages ``[Hkv, N, PAGE, D]``."""
    return paddle.zeros([kv_heads, pages, dim, PAGE], "float32"), paddle.zeros([kv_heads, pages, PAGE, dim], "float32")


def store(k_pages: paddle.Tensor, v_pages: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor,
          slots: np.ndarray) -> None:
    """Writes rows k/v ``[M, Hkv, D]`` into the pages at token slots ``slots`` ``[M]`` (page * PAGE + offset)."""
    _store(_np(k_pages), _np(v_pages), _np(k), _np(v), slots)


def paged(q: paddle.Tensor, k_pages: paddle.Tensor, v_pages: paddle.Tensor, table: np.ndarray,
          seq_of: np.ndarray, positions: np.ndarray, scale: float) -> paddle.Tensor:
    """Attention of rows q ``[R, H, D]`` over their sequences' pages (see ``_attend``) -> ``[R, H, D]``."""
    out = np.empty(q.shape, np.float32)
    _attend(_np(q), _np(k_pages), _np(v_pages), table, seq_of, positions, scale, out)
    return paddle.from_dlpack(out)


def as_pages(k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys and values ``[B, T, Hkv, D]`` as pages (``[Hkv, B * nb, D, PAGE]``, ``[Hkv, B * nb, PAGE, D]``) and
    the page table ``[B, nb]`` that lists sequence b's pages in order."""
    batch, t, kv_heads, dim = k.shape
    blocks = -(-t // PAGE)
    padded = np.zeros((2, batch, blocks * PAGE, kv_heads, dim), np.float32)
    padded[0, :, :t], padded[1, :, :t] = k, v
    split = padded.reshape(2, batch, blocks, PAGE, kv_heads, dim)
    k_pages = np.ascontiguousarray(split[0].transpose(3, 0, 1, 4, 2)).reshape(kv_heads, batch * blocks, dim, PAGE)
    v_pages = np.ascontiguousarray(split[1].transpose(3, 0, 1, 2, 4)).reshape(kv_heads, batch * blocks, PAGE, dim)
    return k_pages, v_pages, np.arange(batch * blocks, dtype=np.int64).reshape(batch, blocks)


def _causal(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, scale: float) -> paddle.Tensor:
    batch, t, heads, dim = q.shape
    k_pages, v_pages, table = as_pages(_np(k), _np(v))
    out = np.empty((batch * t, heads, dim), np.float32)
    _attend(np.ascontiguousarray(_np(q).reshape(batch * t, heads, dim)), k_pages, v_pages, table,
            np.repeat(np.arange(batch, dtype=np.int64), t), np.tile(np.arange(t, dtype=np.int64), batch),
            scale, out)
    return paddle.from_dlpack(out.reshape(batch, t, heads, dim))


class _Causal(paddle.autograd.PyLayer):
    """The compiled forward in training too (the trainer's logits are then the server's); the gradient is written
    out in Paddle ops from the same inputs."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return _causal(q, k, v, scale)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v = ctx.saved_tensor()
        batch, t, heads, dim = q.shape
        group = heads // k.shape[2]
        qh, kh, vh, dh = (x.transpose([0, 2, 1, 3]) for x in (q, paddle.repeat_interleave(k, group, axis=2),
                                                              paddle.repeat_interleave(v, group, axis=2), d_out))
        future = paddle.triu(paddle.full([t, t], float("-inf"), "float32"), diagonal=1)
        p = paddle.nn.functional.softmax(paddle.matmul(qh, kh, transpose_y=True) * ctx.scale + future, axis=-1)
        dp = paddle.matmul(dh, vh, transpose_y=True)
        ds = p * (dp - (dp * p).sum(axis=-1, keepdim=True)) * ctx.scale
        dq = paddle.matmul(ds, kh).transpose([0, 2, 1, 3])
        dk = paddle.matmul(ds, qh, transpose_x=True).transpose([0, 2, 1, 3])
        dv = paddle.matmul(p, dh, transpose_x=True).transpose([0, 2, 1, 3])
        kv_shape = [batch, t, heads // group, group, dim]
        return dq, dk.reshape(kv_shape).sum(axis=3), dv.reshape(kv_shape).sum(axis=3)


def causal(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, scale: float) -> paddle.Tensor:
    """Full-sequence attention, q ``[B, T, H, D]``, k/v ``[B, T, Hkv, D]``: token t sees tokens 0..t.
    Differentiable."""
    if paddle.is_grad_enabled() and not all(x.stop_gradient for x in (q, k, v)):
        return _Causal.apply(q, k, v, scale)
    return _causal(q, k, v, scale)
