"""Triton kernels for the same ops as ``reference.py``, each beside a launcher that checks shapes.

The launchers never allocate: callers pass outputs, so the same code runs on torch tensors (tests under
``TRITON_INTERPRET=1``, the GPU check) and on Paddle GPU tensors (through Paddle's torch proxy, see
``dispatch.py``). Every kernel computes in float32 and rounds once when storing, like the reference.
Inputs must be contiguous: the launchers derive strides from shapes.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator

import triton
import triton.language as tl

ELEMENTWISE_BLOCK = 2048


@triton.jit
def _rounded(x, ty: tl.constexpr):
    """``x`` (float32) in dtype ``ty``, rounded to nearest even. bfloat16 is rounded on the bits so the result is
    the same on a GPU and in Triton's interpreter (which truncates). A NaN keeps its sign and the top of its payload,
    quieted (the payload's top bits may all be zero: without the quiet bit it would read as an infinity)."""
    if ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        half = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(x != x, (bits >> 16) | 0x0040, half).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(ty)


_LAUNCH = threading.Lock()


def stream_of(t) -> tuple[int, int]:
    """``(device index, raw CUDA stream)`` the tensor's own framework runs its next op on, so a launch is ordered
    after the ops that wrote its inputs. A Paddle tensor's ``.place`` is a ``libpaddle.Place``, which
    ``paddle.device.current_stream`` refuses (it takes only ``str``/``CUDAPlace``/``XPUPlace``/``CustomPlace``,
    ``python/paddle/device/__init__.py``); the raw stream is read by device index the way Paddle itself does for
    foreign frameworks (``Tensor.__tvm_ffi_env_stream__`` in ``python/paddle/base/dygraph/tensor_patch_methods.py``,
    ``_cuda_getCurrentRawStream`` in ``python/paddle/_C.py``)."""
    place = getattr(t, "place", None)
    if place is not None and hasattr(place, "gpu_device_id"):
        from paddle.base import libpaddle

        device = place.gpu_device_id()
        return device, libpaddle._get_current_raw_stream(device)
    import torch

    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


@contextlib.contextmanager
def current_device(utils, device: int) -> Iterator[None]:
    """``device``'s primary CUDA context made current on this thread, the previous one put back after. Triton loads
    a kernel's module into the current context and launches it there (``setCurrentDevice``/``getCurrentDevice`` and
    ``cuLaunchKernelEx`` in ``third_party/nvidia/backend/driver.c``): a tensor on gpu:1 launched from a thread whose
    context is gpu:0 would run in the wrong context. Paddle's runtime-API device switches use the same primary
    contexts."""
    previous = utils.get_current_device()
    if previous == device:
        yield
        return
    utils.set_current_device(device)
    try:
        yield
    finally:
        utils.set_current_device(previous)


def launch(kernel, grid, *args, **meta) -> None:
    """Every kernel starts here, on the device and stream of its first tensor argument, with that device current.
    Triton's ``JITFunction.run`` (``python/triton/runtime/jit.py``) asks its driver for the current device and
    stream, which it knows only through torch; a Paddle tensor reached through Paddle's torch proxy must not depend
    on that answer (a launch on another stream than Paddle's reads tensors before Paddle has written them: wrong
    tokens, no error). The interpreter has no streams."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        kernel[grid](*args, **meta)
        return
    device, stream = stream_of(args[0])
    driver = triton.runtime.driver.active
    with _LAUNCH, current_device(driver.utils, device):
        saved = driver.get_current_device, driver.get_current_stream
        driver.get_current_device, driver.get_current_stream = (lambda: device), (lambda _device=None: stream)
        try:
            kernel[grid](*args, **meta)
        finally:
            driver.get_current_device, driver.get_current_stream = saved


def _numel(x) -> int:
    return math.prod(int(d) for d in x.shape)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _contiguous(*tensors) -> None:
    for t in tensors:
        _require(t.is_contiguous(), "triton kernels need contiguous tensors; call .contiguous() first")


@triton.jit
def _cast_copy_kernel(dst_ptr, src_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src_ptr + offs, mask=mask)
    if dst_ptr.dtype.element_ty == src_ptr.dtype.element_ty:  # a copy moves bits: NaN payloads are data too
        tl.store(dst_ptr + offs, x, mask=mask)
    else:
        tl.store(dst_ptr + offs, _rounded(x.to(tl.float32), dst_ptr.dtype.element_ty), mask=mask)


def cast_copy_(dst, src):
    """In-place ``dst[...] = src`` with a dtype cast; one pass, no temporary. Between equal dtypes it is a bitwise
    copy (a checkpoint's NaN payloads survive, so its digest does)."""
    _require(_numel(dst) == _numel(src), f"cast_copy_: {list(src.shape)} does not fit {list(dst.shape)}")
    _contiguous(dst, src)
    n = _numel(dst)
    if n:
        launch(_cast_copy_kernel, (triton.cdiv(n, ELEMENTWISE_BLOCK),), dst, src, n, BLOCK=ELEMENTWISE_BLOCK)
    return dst


@triton.jit
def _xor_at_kernel(words_ptr, index_ptr, bits_ptr, k, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < k
    at = tl.load(index_ptr + offs, mask=mask, other=0)
    bits = tl.load(bits_ptr + offs, mask=mask, other=0)
    tl.store(words_ptr + at, tl.load(words_ptr + at, mask=mask) ^ bits, mask=mask)


def xor_at_(words, index, bits) -> None:
    """``words[index] ^= bits`` in place: a delta's changes applied where the tensor lives. ``words`` is a flat
    integer view of the tensor's elements, ``index`` (int64) names each changed element once (a delta's are
    increasing), so no two programs write one element."""
    k = _numel(index)
    _require(len(words.shape) == 1, "xor_at_: words must be a flat view of the tensor")
    _require(list(bits.shape) == [k], f"xor_at_: {list(bits.shape)} XOR words for {k} indices")
    _require(words.dtype == bits.dtype, "xor_at_: the XOR words must have the tensor's word width")
    _contiguous(words, index, bits)
    if k:
        launch(_xor_at_kernel, (triton.cdiv(k, ELEMENTWISE_BLOCK),), words, index, bits, k, BLOCK=ELEMENTWISE_BLOCK)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    h = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_out_ptr + row * n_cols + cols, _rounded(h, res_out_ptr.dtype.element_ty), mask=mask)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, _rounded(h * inv * w, out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x, weight, eps: float, out, residual=None, residual_out=None) -> None:
    """RMSNorm over the last axis into ``out``; with ``residual``, normalises ``x + residual`` and writes that
    sum to ``residual_out`` (which may be ``residual`` itself)."""
    n_cols = int(x.shape[-1])
    _require(list(weight.shape) == [n_cols], f"rms_norm: weight {list(weight.shape)} for rows of {n_cols}")
    _require((residual is None) == (residual_out is None), "rms_norm: residual and residual_out go together")
    _contiguous(x, weight, out, *([residual, residual_out] if residual is not None else []))
    rows, block = _numel(x) // max(n_cols, 1), triton.next_power_of_2(n_cols)
    if rows:
        launch(_rms_norm_kernel, (rows,), x, residual if residual is not None else x, weight, out,
               residual_out if residual_out is not None else out, n_cols, eps,
               HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 512, 1), 16))


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, seq, heads, HALF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # one (batch, position, head) vector of length 2 * HALF
    pos = (row // heads) % seq
    cols = tl.arange(0, BLOCK)
    mask = cols < HALF
    base = x_ptr + row * 2 * HALF
    x1 = tl.load(base + cols, mask=mask).to(tl.float32)
    x2 = tl.load(base + HALF + cols, mask=mask).to(tl.float32)
    c = tl.load(cos_ptr + pos * HALF + cols, mask=mask).to(tl.float32)
    s = tl.load(sin_ptr + pos * HALF + cols, mask=mask).to(tl.float32)
    tl.store(base + cols, _rounded(x1 * c - x2 * s, x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + HALF + cols, _rounded(x2 * c + x1 * s, x_ptr.dtype.element_ty), mask=mask)


def rotary_(q, k, cos, sin) -> None:
    """Rotates q ``[B, T, H, D]`` and k ``[B, T, Hkv, D]`` in place with cos/sin ``[T, D/2]``."""
    _contiguous(q, k, cos, sin)
    seq, half = int(q.shape[1]), int(q.shape[3]) // 2
    _require(int(q.shape[3]) % 2 == 0, "rotary_: head size must be even")
    _require(list(cos.shape) == [seq, half] == list(sin.shape), f"rotary_: cos/sin must be [{seq}, {half}]")
    for x in (q, k):
        _require(int(x.shape[1]) == seq and int(x.shape[3]) == 2 * half, "rotary_: q and k disagree in T or D")
        rows = _numel(x) // (2 * half) if half else 0
        if rows:
            launch(_rotary_kernel, (rows,), x, cos, sin, seq, int(x.shape[2]), HALF=half,
                                    BLOCK=triton.next_power_of_2(half))


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, _rounded(g / (1.0 + tl.exp(-g)) * u, out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate, up, out) -> None:
    """``out = silu(gate) * up``."""
    _require(list(gate.shape) == list(up.shape) == list(out.shape), "swiglu: gate, up and out differ in shape")
    _contiguous(gate, up, out)
    n = _numel(gate)
    if n:
        launch(_swiglu_kernel, (triton.cdiv(n, ELEMENTWISE_BLOCK),), gate, up, out, n, BLOCK=ELEMENTWISE_BLOCK)


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, table_ptr, len_ptr, out_ptr, pages, blocks, scale,
                             HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, PAGE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kv = h // (HEADS // KV_HEADS)
    length = tl.load(len_ptr + b).to(tl.int32)
    d = tl.arange(0, BLOCK_D)
    dmask = d < DIM
    q = tl.load(q_ptr + (b * HEADS + h) * DIM + d, mask=dmask, other=0.0).to(tl.float32) * scale
    m = tl.full([1], float("-inf"), tl.float32)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    slot = tl.arange(0, PAGE)
    for block in range(0, tl.cdiv(length, PAGE)):
        page = tl.load(table_ptr + b * blocks + block).to(tl.int64)
        smask = block * PAGE + slot < length
        offs = ((kv * pages + page) * PAGE + slot[:, None]) * DIM + d[None, :]  # pages are [Hkv, N, PAGE, D]
        both = smask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs, mask=both, other=0.0).to(tl.float32)
        scores = tl.where(smask, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        correction = tl.exp(m - m_new)
        v = tl.load(v_ptr + offs, mask=both, other=0.0).to(tl.float32)
        acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
        total = total * correction + tl.sum(p, axis=0)
        m = m_new
    tl.store(out_ptr + (b * HEADS + h) * DIM + d, _rounded(acc / total, out_ptr.dtype.element_ty), mask=dmask)


def decode_attention(q, k_pages, v_pages, page_table, lengths, scale: float, out) -> None:
    """Attention of one query per sequence, q ``[B, H, D]``, over the first ``lengths[b]`` keys of sequence b,
    kept in pages ``[Hkv, N, PAGE, D]`` listed by ``page_table`` ``[B, nb]``; into ``out`` ``[B, H, D]``
    (grouped-query: head h reads h // (H // Hkv)). Every length must be in 1..nb*PAGE."""
    batch, heads, dim = (int(s) for s in q.shape)
    kv_heads, pages, page = (int(s) for s in k_pages.shape[:3])
    _require(list(k_pages.shape) == list(v_pages.shape) == [kv_heads, pages, page, dim],
             f"decode_attention: pages must be [Hkv, N, PAGE, {dim}]")
    _require(heads % kv_heads == 0, f"decode_attention: {heads} heads do not group over {kv_heads} kv heads")
    _require(int(page_table.shape[0]) == batch and list(lengths.shape) == [batch],
             f"decode_attention: page_table must be [{batch}, nb] and lengths [{batch}]")
    _contiguous(q, k_pages, v_pages, page_table, lengths, out)
    launch(_decode_attention_kernel, (batch, heads), q, k_pages, v_pages, page_table, lengths, out, pages,
                                             int(page_table.shape[1]), scale, HEADS=heads, KV_HEADS=kv_heads,
                                             DIM=dim, BLOCK_D=triton.next_power_of_2(dim), PAGE=page)
