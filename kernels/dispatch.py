"""The ops the model and the loader call: the Triton kernel for tensors on a CUDA place, the compiled CPU kernel
(``kernels.cpu_attention``) for float32 attention on CPU, the Paddle reference everywhere else. Callers never
pick a backend themselves.

Triton reaches Paddle GPU tensors through Paddle's torch proxy (``paddle.compat.enable_torch_proxy``),
enabled for the ``triton`` module only so a real PyTorch in the same process is left alone.
``BATON_KERNELS=reference`` forces the reference (for bisecting a numerical difference on a GPU host).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import numpy as np
import paddle

from kernels import cpu_attention, gemm, reference
from kernels.gemm import fingerprint, same_machine, use_every_core  # noqa: F401  (re-exported)
from kernels.reference import MAX_ROWS, PAGE, Plan  # noqa: F401  (re-exported for callers)


@functools.cache
def _triton_ops() -> ModuleType | None:
    if os.environ.get("BATON_KERNELS", "auto") == "reference":
        return None
    try:
        paddle.compat.enable_torch_proxy(scope={"triton"}, silent=True)
        from kernels import triton_ops
    except ImportError:
        return None
    return triton_ops


def backend(x: paddle.Tensor) -> str:
    """``"triton"`` or ``"reference"``: what an op on ``x`` runs."""
    on_gpu = x.place.is_gpu_place()
    return "triton" if on_gpu and _triton_ops() is not None else "reference"


def _gpu(x: paddle.Tensor) -> ModuleType | None:
    return _triton_ops() if backend(x) == "triton" else None


def _on(x: paddle.Tensor, place) -> paddle.Tensor:
    """``x`` on ``place``: moved there once when it lives elsewhere (a host tensor read as a device pointer, or
    written into device memory element by element, would be garbage or a host round trip per op)."""
    return x if x.place == place else x.to(place)


def _ready(x: paddle.Tensor, place) -> paddle.Tensor:
    """``x`` as a Triton launcher must get it: contiguous (the launchers derive strides from shapes) and on the
    place of the op's first tensor."""
    x = _on(x, place)
    return x if x.is_contiguous() else x.contiguous()


def matmul(x: paddle.Tensor, w: paddle.Tensor, transpose_y: bool = False, invariant: bool = True) -> paddle.Tensor:
    """``x @ w`` (``x @ w.T`` with ``transpose_y``) for rows ``x`` ``[M, in]``: on CPU in float32 through
    ``kernels.gemm``, where with ``invariant`` a row's result does not depend on M; cuBLAS through Paddle
    elsewhere."""
    if x.place.is_cpu_place() and x.dtype == paddle.float32:
        return gemm.cpu_matmul(x, w, transpose_y, invariant)
    return paddle.matmul(x, w, transpose_y=transpose_y)


def cast_copy_(dst: paddle.Tensor, src: paddle.Tensor) -> paddle.Tensor:
    """The weight-apply kernel: ``dst`` takes ``src``'s values in place, cast to ``dst``'s dtype, with no
    full-size temporary. Matches ``storage.load_snapshot(copy_fn=...)``. ``src`` may live on the host."""
    if list(dst.shape) != list(src.shape):
        raise ValueError(f"cast_copy_: a {list(src.shape)} tensor cannot be written into {list(dst.shape)}")
    ops = _gpu(dst)
    if ops is None:
        return reference.cast_copy_(dst, src)
    src = _on(src.detach(), dst.place)  # a host src crosses once, then is cast on the device
    if not dst.is_contiguous():  # a strided view (a column shard) has no flat alias for a launcher to write
        return reference.cast_copy_(dst, src)
    ops.cast_copy_(dst.detach(), _ready(src, dst.place))
    return dst


_WORDS = {1: (paddle.uint8, np.uint8, np.uint8), 2: (paddle.int16, np.uint16, np.int16),
          4: (paddle.int32, np.uint32, np.int32), 8: (paddle.int64, np.uint64, np.int64)}


def xor_at_(dst: paddle.Tensor, index: np.ndarray, xors: np.ndarray) -> None:
    """The delta-apply kernel: the elements of ``dst`` (contiguous) at ``index`` take their bits XOR ``xors``
    (``storage.deltacodec.changes``: uint64 holding element-width words), in ``dst``'s own memory on its own
    device. Only the changes cross from the host; a device tensor is never copied out and back."""
    if not dst.is_contiguous():
        raise ValueError("xor_at_: the target must be contiguous (its elements are addressed by flat index)")
    paddle_words, unsigned, signed = _WORDS[dst.element_size()]
    words = dst.detach().view(paddle_words).reshape([-1])
    at = paddle.to_tensor(np.ascontiguousarray(index, np.int64), place=dst.place)
    bits = paddle.to_tensor(np.ascontiguousarray(xors.astype(unsigned).view(signed)), place=dst.place)
    ops = _gpu(dst)
    if ops is None:
        reference.xor_at_(words, at, bits)
    else:
        ops.xor_at_(words, at, bits)


def rms_norm(
    x: paddle.Tensor, weight: paddle.Tensor, eps: float, residual: paddle.Tensor | None = None
) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """Fused ``residual add + RMSNorm``: returns ``(normed, x + residual)``, or ``(normed, None)`` without one."""
    ops = _gpu(x)
    if ops is None:
        return reference.rms_norm(x, weight, eps, residual)
    x = _ready(x, x.place)
    out = paddle.empty_like(x)
    summed = None if residual is None else paddle.empty_like(x)
    ops.rms_norm(x, _ready(weight, x.place), eps, out, None if residual is None else _ready(residual, x.place), summed)
    return out, summed


def rotary_(q: paddle.Tensor, k: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> None:
    """Rotary position embedding applied to q ``[B, T, H, D]`` and k ``[B, T, Hkv, D]`` in place."""
    if cpu_attention.supports(q, k, cos, sin) and all(x.is_contiguous() for x in (q, k, cos, sin)):
        return cpu_attention.rotary_(q, k, cos, sin)
    ops = _gpu(q)
    if ops is None or not (q.is_contiguous() and k.is_contiguous()):  # rotated in place: no copy to rotate
        reference.rotary_(q, k, cos, sin)
    else:
        ops.rotary_(q, _ready(k, q.place), _ready(cos, q.place), _ready(sin, q.place))


def rotary(q: paddle.Tensor, k: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor):
    """Out-of-place, differentiable rotary embedding for training; Paddle ops on any place."""
    return reference.rotary(q, k, cos, sin)


def swiglu(gate: paddle.Tensor, up: paddle.Tensor) -> paddle.Tensor:
    """``silu(gate) * up``."""
    ops = _gpu(gate)
    if ops is None:
        return reference.swiglu(gate, up)
    gate = _ready(gate, gate.place)
    out = paddle.empty_like(gate)
    ops.swiglu(gate, _ready(up, gate.place), out)
    return out


def new_kv_pages(kv_heads: int, pages: int, dim: int, dtype: str = "float32",
                 place=None) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Zeroed key and value pages of a KV cache on ``place`` (the model's; the CPU by default), laid out for its
    attention kernel: keys ``[Hkv, N, D, PAGE]`` (transposed within a page) for the CPU kernel, ``[Hkv, N, PAGE, D]``
    elsewhere; values ``[Hkv, N, PAGE, D]``. Either way axis 1 is the page."""
    place = place if place is not None else paddle.CPUPlace()
    if dtype == "float32" and place.is_cpu_place():
        return cpu_attention.new_pages(kv_heads, pages, dim)
    return tuple(paddle.zeros([kv_heads, pages, PAGE, dim], dtype, device=place) for _ in range(2))


def store_kv(k_pages: paddle.Tensor, v_pages: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor,
             slots: np.ndarray) -> None:
    """Writes rows k/v ``[M, Hkv, D]`` into pages from ``new_kv_pages`` at token slots ``slots`` ``[M]``
    (page * PAGE + offset)."""
    if cpu_attention.supports(k_pages, v_pages):
        cpu_attention.store(k_pages, v_pages, k.astype("float32"), v.astype("float32"), slots)
    else:
        reference.store_kv(k_pages, v_pages, k, v, slots)


def decode_attention(q: paddle.Tensor, k_pages: paddle.Tensor, v_pages: paddle.Tensor, page_table: paddle.Tensor,
                     lengths: paddle.Tensor, scale: float) -> paddle.Tensor:
    """One new token per sequence, q ``[B, H, D]``, against the first ``lengths[b]`` keys of its pages (from
    ``new_kv_pages``; table ``[B, nb]``): the batched decode step, every sequence at its own length."""
    if cpu_attention.supports(q, k_pages, v_pages):
        return cpu_attention.paged(q, k_pages, v_pages, np.ascontiguousarray(page_table.numpy(), np.int64),
                                   np.arange(q.shape[0], dtype=np.int64), lengths.numpy().astype(np.int64) - 1, scale)
    ops = _gpu(q)
    if ops is None:
        return reference.decode_attention(q, k_pages, v_pages, page_table, lengths, scale)
    q = _ready(q, q.place)
    out = paddle.empty_like(q)
    ops.decode_attention(q, _ready(k_pages, q.place), _ready(v_pages, q.place), _ready(page_table, q.place),
                         _ready(lengths, q.place), scale, out)
    return out


def paged_attention(q: paddle.Tensor, k_pages: paddle.Tensor, v_pages: paddle.Tensor, plan: Plan,
                    scale: float) -> paddle.Tensor:
    """q ``[G, T, H, D]`` of the plan's sequences over their pages (from ``new_kv_pages``): the compiled kernel on
    CPU, the decode kernel when T is 1 on a GPU, Paddle ops otherwise (prefill chunks on a GPU)."""
    if cpu_attention.supports(q, k_pages, v_pages):
        count, t, heads, dim = q.shape
        out = cpu_attention.paged(q.reshape([count * t, heads, dim]), k_pages, v_pages, plan.table, *plan.rows, scale)
        return out.reshape(q.shape)
    ops = _gpu(q)
    if ops is None or q.shape[1] != 1:
        return reference.paged_attention(q, k_pages, v_pages, plan, scale)
    q0 = _ready(q[:, 0], q.place)
    out = paddle.empty_like(q0)
    ops.decode_attention(q0, _ready(k_pages, q.place), _ready(v_pages, q.place), _ready(plan.page_table, q.place),
                         _ready(plan.lengths, q.place), scale, out)
    return out.unsqueeze(1)


def causal_attention(q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor, scale: float) -> paddle.Tensor:
    """Full-sequence causal attention (the trainer's forward); differentiable. On CPU the same compiled kernel as
    the server's paged attention, so a trainer's logits are the server's bit for bit."""
    if cpu_attention.supports(q, k, v):
        return cpu_attention.causal(q, k, v, scale)
    return reference.causal_attention(q, k, v, scale)
