"""Kernels: the Paddle references against plain numpy, and the Triton kernels (under Triton's CPU interpreter,
on torch tensors holding the same values) against the references."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import numpy as np
import paddle
import pytest
import torch

import kernels
from kernels import cpu_attention, gemm, reference, triton_ops

DTYPES = ["float32", "bfloat16", "float16"]
# One rounding of the output dtype, relative (plus a small absolute floor for values near zero).
TOL = {"float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3}


def values(shape, dtype: str, seed: int, scale: float = 1.0) -> np.ndarray:
    """Random float32 values that ``dtype`` holds exactly, so every framework starts from the same numbers."""
    x = (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)
    return paddle.to_tensor(x).astype(dtype).astype("float32").numpy()


def pd(x: np.ndarray, dtype: str) -> paddle.Tensor:
    return paddle.to_tensor(x).astype(dtype)


def th(x: np.ndarray, dtype: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, dtype))


def f32(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.float().numpy()
    return t.astype("float32").numpy()


def close(got: np.ndarray, want: np.ndarray, dtype: str) -> None:
    np.testing.assert_allclose(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def np_rms_norm(x, w, eps, residual=None):
    h = x if residual is None else x + residual
    return h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * w, h


def np_rotary(x, cos, sin):
    x1, x2 = np.split(x, 2, axis=-1)
    c, s = cos[None, :, None], sin[None, :, None]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def np_decode_attention(q, k, v, length, scale):
    heads, kv_heads = q.shape[1], k.shape[2]
    k = np.repeat(k[:, :length], heads // kv_heads, axis=2)  # [B, L, H, D]
    v = np.repeat(v[:, :length], heads // kv_heads, axis=2)
    s = np.einsum("bhd,blhd->bhl", q.astype(np.float64), k) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhl,blhd->bhd", p / p.sum(-1, keepdims=True), v)


def rope_tables(seq: int, half: int):
    angles = np.arange(seq)[:, None] * (10000.0 ** (-np.arange(half) / half))[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


# ---- references against numpy -------------------------------------------------------------------------------


@pytest.mark.parametrize("src_dtype,dst_dtype", [("float32", "bfloat16"), ("float32", "float16"),
                                                 ("bfloat16", "float32"), ("float32", "float32")])
@pytest.mark.parametrize("shape", [(7,), (33, 65), (3, 5, 7)])
def test_reference_cast_copy_writes_in_place(src_dtype, dst_dtype, shape, monkeypatch):
    monkeypatch.setattr(reference, "CAST_CHUNK", 10)  # several chunks even for small tensors
    src = values(shape, src_dtype, 1)
    dst = paddle.zeros(shape, dtype=dst_dtype)
    ptr = dst.data_ptr()
    assert reference.cast_copy_(dst, pd(src, src_dtype)) is dst
    assert dst.data_ptr() == ptr
    np.testing.assert_array_equal(f32(dst), paddle.to_tensor(src).astype(dst_dtype).astype("float32").numpy())


def test_reference_cast_copy_into_a_parameter():
    layer = paddle.nn.Linear(5, 3)
    src = values((5, 3), "float32", 2)
    reference.cast_copy_(layer.weight, pd(src, "bfloat16"))
    np.testing.assert_array_equal(layer.weight.numpy(), values((5, 3), "bfloat16", 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 96), (7, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_rms_norm(dtype, shape, with_residual):
    x, w, r = values(shape, dtype, 3), values(shape[-1:], dtype, 4), values(shape, dtype, 5)
    out, summed = reference.rms_norm(pd(x, dtype), pd(w, dtype), 1e-6, pd(r, dtype) if with_residual else None)
    want, want_sum = np_rms_norm(x, w, 1e-6, r if with_residual else None)
    assert out.dtype == pd(x, dtype).dtype
    close(f32(out), want, dtype)
    if with_residual:
        close(f32(summed), want_sum, dtype)
    else:
        assert summed is None


@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_rms_norm_rows_do_not_depend_on_the_batch(with_residual):
    rng = np.random.default_rng(3)
    x, r = (paddle.to_tensor(rng.standard_normal((255, 512), np.float32)) for _ in range(2))
    w = paddle.to_tensor(rng.standard_normal(512, np.float32))
    full = reference.rms_norm(x, w, 1e-6, r if with_residual else None)[0].numpy()
    for m in (1, 2, 7, 8, 9, 31, 64, 128, 200):
        rows = reference.rms_norm(x[:m], w, 1e-6, r[:m] if with_residual else None)[0].numpy()
        np.testing.assert_array_equal(rows, full[:m])


@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_rms_norm_gradient_matches_autograd_of_the_formula(with_residual):
    """The fused op has no CPU gradient kernel; the hand-written one must equal autograd of the plain formula."""
    rng = np.random.default_rng(4)
    x0, r0, g_out, g_sum = (rng.standard_normal((6, 64), np.float32) for _ in range(4))
    w0 = rng.standard_normal(64, np.float32)

    def grads(fn):
        x, r, w = (paddle.to_tensor(a, stop_gradient=False) for a in (x0, r0, w0))
        out, summed = fn(x, w, r if with_residual else None)
        loss = (out * paddle.to_tensor(g_out)).sum()
        if with_residual:
            loss = loss + (summed * paddle.to_tensor(g_sum)).sum()
        loss.backward()
        return [t.grad.numpy() for t in ((x, w, r) if with_residual else (x, w))]

    def formula(x, w, r):
        h = x if r is None else x + r
        return h * paddle.rsqrt((h * h).mean(axis=-1, keepdim=True) + 1e-6) * w, (None if r is None else h)

    for got, want in zip(grads(lambda x, w, r: reference.rms_norm(x, w, 1e-6, r)), grads(formula)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 3, 1001)])
def test_reference_swiglu(dtype, shape):
    g, u = values(shape, dtype, 8, 3.0), values(shape, dtype, 9)
    out = reference.swiglu(pd(g, dtype), pd(u, dtype))
    close(f32(out), g / (1 + np.exp(-g)) * u, dtype)


def paged(k: np.ndarray, table: np.ndarray, pages: int) -> np.ndarray:
    """Contiguous caches ``[B, S, Hkv, D]`` scattered into pages ``[Hkv, N, PAGE, D]`` at ``table``'s pages."""
    batch, slots, kv_heads, dim = k.shape
    out = np.zeros((kv_heads, pages, reference.PAGE, dim), k.dtype)
    for b in range(batch):
        for s in range(slots):
            out[:, table[b, s // reference.PAGE], s % reference.PAGE] = k[b, s]
    return out


def page_table(batch: int, slots: int, pages: int, seed: int) -> np.ndarray:
    blocks = -(-slots // reference.PAGE)
    return np.random.default_rng(seed).permutation(np.arange(1, pages))[: batch * blocks].reshape(batch, blocks)


def test_reference_decode_attention_ignores_keys_past_each_length():
    q, k, v = values((2, 2, 8), "float32", 1), values((2, 40, 1, 8), "float32", 2), values((2, 40, 1, 8), "float32", 3)
    table, lengths = page_table(2, 40, 12, 4), pd(np.array([5, 33]), "int64")

    def run():
        return reference.decode_attention(pd(q, "float32"), pd(paged(k, table, 12), "float32"),
                                          pd(paged(v, table, 12), "float32"), pd(table, "int64"), lengths, 0.3)

    a = run()
    k[0, 5:], v[0, 5:], k[1, 33:], v[1, 33:] = 1e4, -1e4, 1e4, -1e4
    np.testing.assert_array_equal(a.numpy(), run().numpy())


def cpu_pages(k: np.ndarray, v: np.ndarray, table: np.ndarray, pages: int) -> tuple[paddle.Tensor, paddle.Tensor]:
    """The CPU kernel's layout: keys transposed within a page (``[Hkv, N, D, PAGE]``), values as ``paged``."""
    return pd(np.ascontiguousarray(paged(k, table, pages).transpose(0, 1, 3, 2)), "float32"), pd(paged(v, table, pages),
                                                                                               "float32")


@pytest.mark.parametrize("heads, kv_heads, dim", [(4, 2, 16), (4, 4, 16), (14, 2, 64), (8, 2, 64), (2, 1, 24)])
def test_cpu_paged_and_causal_attention_are_bit_identical_per_row(heads, kv_heads, dim):
    """The trainer's full-sequence attention and the engine's paged attention (decode and prefill chunks) give the
    same bits for a query, whatever the batch, chunk, page order or padding around it: the basis of train/infer
    parity. Also close to float64 attention."""
    q, k, v = (values((3, 37, h, dim), "float32", seed) for h, seed in ((heads, 5), (kv_heads, 6), (kv_heads, 7)))
    full = kernels.causal_attention(pd(q, "float32"), pd(k, "float32"), pd(v, "float32"), 0.25).numpy()
    alone = kernels.causal_attention(pd(q[1:2, :20], "float32"), pd(k[1:2, :20], "float32"),
                                     pd(v[1:2, :20], "float32"), 0.25).numpy()
    np.testing.assert_array_equal(full[1, :20], alone[0])
    for b, t in ((0, 0), (1, 19), (2, 36)):
        want = np_decode_attention(q[b : b + 1, t], k[b : b + 1], v[b : b + 1], t + 1, 0.25)
        np.testing.assert_allclose(full[b, t], want[0], rtol=1e-5, atol=1e-5)
    table = page_table(3, 37, 16, 8)
    kp, vp = cpu_pages(k, v, table, 16)
    lengths = pd(np.array([37, 9, 21]), "int64")
    rows = [36, 8, 20]
    decoded = kernels.decode_attention(pd(q[np.arange(3), rows], "float32"), kp, vp, pd(table, "int64"), lengths,
                                       0.25)
    np.testing.assert_array_equal(decoded.numpy(), full[np.arange(3), rows])
    plan = reference.Plan.build(np.arange(10, 21)[None], heads, kv_heads, table.shape[1] * reference.PAGE,
                                table[2:3], 16, place=paddle.CPUPlace())
    chunk = kernels.paged_attention(pd(q[2:3, 10:21], "float32"), kp, vp, plan, 0.25)
    np.testing.assert_array_equal(chunk.numpy()[0], full[2, 10:21])


def test_cpu_attention_ignores_keys_past_each_length_and_stores_rows_in_its_layout():
    q, k, v = values((2, 2, 8), "float32", 1), values((2, 40, 1, 8), "float32", 2), values((2, 40, 1, 8), "float32", 3)
    table, lengths = page_table(2, 40, 12, 4), pd(np.array([5, 33]), "int64")
    kp, vp = kernels.new_kv_pages(1, 12, 8)
    slots = (table[:, :, None] * reference.PAGE + np.arange(reference.PAGE)).reshape(2, -1)[:, :40]
    kernels.store_kv(kp, vp, pd(k.reshape(80, 1, 8), "float32"), pd(v.reshape(80, 1, 8), "float32"),
                     slots.reshape(-1))
    want_k, want_v = cpu_pages(k, v, table, 12)
    np.testing.assert_array_equal(kp.numpy(), want_k.numpy())
    np.testing.assert_array_equal(vp.numpy(), want_v.numpy())

    def run():
        return kernels.decode_attention(pd(q, "float32"), kp, vp, pd(table, "int64"), lengths, 0.3).numpy()

    a = run()
    for b, n in ((0, 5), (1, 33)):
        np.testing.assert_allclose(a[b : b + 1], np_decode_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], n, 0.3),
                                   rtol=1e-5, atol=1e-5)
    k[0, 5:], v[0, 5:], k[1, 33:], v[1, 33:] = 1e4, -1e4, 1e4, -1e4
    kp, vp = cpu_pages(k, v, table, 12)
    np.testing.assert_array_equal(a, run())


def test_cpu_attention_bits_do_not_depend_on_the_thread_count():
    """Each (row, head) is computed whole by one thread: the same bits on 1 thread as on every core."""
    import numba

    q, k, v = (values((2, 50, h, 32), "float32", seed) for h, seed in ((4, 1), (2, 2), (2, 3)))
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = kernels.causal_attention(pd(q, "float32"), pd(k, "float32"), pd(v, "float32"), 0.2).numpy()
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(one, kernels.causal_attention(pd(q, "float32"), pd(k, "float32"),
                                                                pd(v, "float32"), 0.2).numpy())


def test_cpu_causal_attention_gradients_match_autograd_of_paddle_attention():
    """The compiled forward's hand-written backward (the trainer's) against autograd of the Paddle reference."""
    rng = np.random.default_rng(9)
    arrays = [rng.standard_normal((2, 21, h, 16), np.float32) for h in (4, 2, 2)]
    weights = rng.standard_normal((2, 21, 4, 16), np.float32)

    def grads(fn):
        ts = [paddle.to_tensor(x, stop_gradient=False) for x in arrays]
        out = fn(*ts, 0.25)
        (out * paddle.to_tensor(weights)).sum().backward()
        return [out.numpy()] + [t.grad.numpy() for t in ts]

    for got, want in zip(grads(cpu_attention.causal), grads(reference.causal_attention)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_in, n_out, transpose_y", [(64, 176, False), (512, 256, False), (1408, 512, False),
                                                     (512, 258, True), (896, 128, False)])
def test_cpu_matmul_rows_do_not_depend_on_the_batch(n_in, n_out, transpose_y):
    rng = np.random.default_rng(6)
    x = paddle.to_tensor(rng.standard_normal((300, n_in), np.float32))
    w = paddle.to_tensor(rng.standard_normal((n_out, n_in) if transpose_y else (n_in, n_out), np.float32))
    full = gemm.cpu_matmul(x, w, transpose_y).numpy()
    np.testing.assert_allclose(full, x.numpy() @ (w.numpy().T if transpose_y else w.numpy()), rtol=1e-4, atol=1e-4)
    for m in (1, 2, 3, 7, 8, 9, 31, 64, 127, 128, 129, 200):
        np.testing.assert_array_equal(gemm.cpu_matmul(x[:m], w, transpose_y).numpy(), full[:m])


def test_k_splits_cut_k_as_openblas_level3_driver_does():
    assert gemm.k_splits(1408, 448, 16).tolist() == [0, 448, 896, 1152, 1408]  # last 512: two halves of 256
    assert gemm.k_splits(512, 448, 16).tolist() == [0, 256, 512]
    assert gemm.k_splits(448, 448, 16).tolist() == [0, 448]
    assert gemm.k_splits(900, 448, 16).tolist() == [0, 448, 688, 900]  # 452 left: halved, rounded up to 16
    assert gemm.k_splits(40, 448, 16).tolist() == [0, 40]


def test_few_row_gemm_rows_are_the_blas_rows_on_this_machine():
    """The few-row loop is only used where it reproduced OpenBLAS: here it must, on rows it was not probed on."""
    rng = np.random.default_rng(9)
    for n_in, n_out, transpose_y in ((512, 1408, False), (1408, 512, False), (896, 4864, False), (896, 3000, True)):
        splits = gemm.blas_order(n_in, n_out, transpose_y)
        if splits is None:
            pytest.skip(f"this machine's BLAS sums {n_in}x{n_out} in another order (rows are padded instead)")
        x = rng.standard_normal((64, n_in), np.float32)
        w = rng.standard_normal((n_out, n_in) if transpose_y else (n_in, n_out), np.float32)
        w = w.T if transpose_y else w  # a tied head: the [n_out, n_in] weight, transposed by the GEMM
        for rows in (x[5:6], x[5:8]):
            got = np.empty((rows.shape[0], n_out), np.float32)
            gemm._few_rows(rows, w, splits, got)
            np.testing.assert_array_equal(got, (x @ w)[5 : 5 + rows.shape[0]])


def test_cpu_gemm_bits_do_not_depend_on_the_blas_thread_count():
    """A trainer process may run OpenBLAS on other thread counts than the server: the same bits either way."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(8)
    x, w = (paddle.to_tensor(rng.standard_normal(s, np.float32)) for s in ((200, 1408), (1408, 512)))

    def run():
        return [gemm.cpu_matmul(x[:m], w).numpy() for m in (1, 8, 31, 200)]

    with threadpool_limits(1, user_api="blas"):
        one = run()
    with threadpool_limits(2, user_api="blas"):
        two = run()
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_blas_uses_every_core_even_when_omp_num_threads_is_1():
    """Paddle sets OMP_NUM_THREADS=1 on import and OpenBLAS reads it when numpy loads: ``baton serve`` ran on one
    BLAS thread. Here the variable is set before numpy loads, as it was in the server."""
    code = ("import os, numpy, paddle; from threadpoolctl import threadpool_info; import kernels; "
            "kernels.use_every_core(); "
            "print(max(i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'), "
            "len(os.sched_getaffinity(0)))")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"} | {"OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    threads, cores = out.split()[-2:]
    assert threads == cores


def test_cpu_gemm_gradients_match_paddles_matmul():
    """The numpy GEMMs' hand-written gradients (the trainer's backward) against autograd of ``paddle.matmul``."""
    rng = np.random.default_rng(7)
    a, b = (rng.standard_normal(s, np.float32) for s in ((2, 3, 6, 16), (2, 3, 32, 16)))

    def grads(fn, *arrays):
        ts = [paddle.to_tensor(x, stop_gradient=False) for x in arrays]
        out = fn(*ts)
        (out * paddle.to_tensor(rng.standard_normal(out.shape, np.float32))).sum().backward()
        return [out.numpy()] + [t.grad.numpy() for t in ts]

    cases = [
        (lambda x, w: gemm.cpu_matmul(x, w), lambda x, w: paddle.matmul(x, w), (a[0, 0], b[0, 0].T.copy())),
        (lambda x, w: gemm.cpu_matmul(x, w, True), lambda x, w: paddle.matmul(x, w, transpose_y=True),
         (a[0, 0], b[0, 0])),
    ]
    for ours, plain, arrays in cases:
        seed = rng.integers(1 << 30)
        rng = np.random.default_rng(seed)
        got = grads(ours, *arrays)
        rng = np.random.default_rng(seed)
        for g, w in zip(got, grads(plain, *arrays)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


# ---- Triton kernels (interpreter) against the references -----------------------------------------------------


@pytest.mark.parametrize("src_dtype,dst_dtype", [("float32", "bfloat16"), ("float32", "float16"),
                                                 ("bfloat16", "float32"), ("float16", "bfloat16")])
@pytest.mark.parametrize("n", [1, 2047, 2048, 5001])
def test_triton_cast_copy_is_bit_identical_to_reference(src_dtype, dst_dtype, n):
    src = values((n,), src_dtype, 13, 100.0)
    want = paddle.zeros([n], dtype=dst_dtype)
    reference.cast_copy_(want, pd(src, src_dtype))
    dst = torch.zeros(n, dtype=getattr(torch, dst_dtype))
    triton_ops.cast_copy_(dst, th(src, src_dtype))
    np.testing.assert_array_equal(f32(dst), f32(want))


# NaNs with payloads (quiet and signalling, both signs) among ordinary values, as raw bits of each width.
NAN_BITS = {
    16: np.array([0x7FC1, 0xFFA5, 0x7F81, 0xFFFF, 0x7C01, 0xFE33, 0x3F80, 0x8001, 0x0000], np.uint16),
    32: np.array([0x7FC00001, 0xFF812345, 0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0x3F808000, 0x3F818000, 0x80000001,
                  0x00000000], np.uint32),
}
TORCH_BITS = {"bfloat16": torch.int16, "float16": torch.int16, "float32": torch.int32}


def from_bits(bits: np.ndarray, dtype: str) -> torch.Tensor:
    signed = bits.view(np.int16 if bits.dtype == np.uint16 else np.int32).copy()
    return torch.from_numpy(signed).view(getattr(torch, dtype))


def to_bits(t: torch.Tensor) -> np.ndarray:
    raw = t.view(TORCH_BITS[str(t.dtype).replace("torch.", "")]).numpy()
    return raw.view(np.uint16 if raw.dtype == np.int16 else np.uint32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_cast_copy_between_equal_dtypes_keeps_every_bit(dtype):
    """A checkpoint's NaN payloads are data: a same-dtype load must not rewrite them, or its digest fails."""
    bits = NAN_BITS[32 if dtype == "float32" else 16]
    dst = torch.zeros(bits.size, dtype=getattr(torch, dtype))
    triton_ops.cast_copy_(dst, from_bits(bits, dtype))
    np.testing.assert_array_equal(to_bits(dst), bits)


def bf16_rounded(bits: np.ndarray) -> np.ndarray:
    """float32 bits -> bfloat16 bits, in numpy integers: round to nearest even; a NaN keeps its sign and the top of
    its payload, quieted."""
    wide = bits.astype(np.uint64)
    nan = ((wide >> 23) & 0xFF == 0xFF) & (wide & 0x7FFFFF != 0)
    rounded = (wide + 0x7FFF + ((wide >> 16) & 1)) >> 16
    return np.where(nan, (wide >> 16) | 0x0040, rounded).astype(np.uint16)


def test_triton_cast_to_bfloat16_keeps_a_nans_sign():
    bits = NAN_BITS[32]
    dst = torch.zeros(bits.size, dtype=torch.bfloat16)
    triton_ops.cast_copy_(dst, from_bits(bits, "float32"))
    got = to_bits(dst)
    np.testing.assert_array_equal(got, bf16_rounded(bits))
    nan = np.isnan(bits.view(np.float32))
    assert np.array_equal(got[nan] >> 15, (bits[nan] >> 31).astype(np.uint16))  # negative NaNs stay negative


@pytest.mark.parametrize("words", [np.uint8, np.int16, np.int32, np.int64])
@pytest.mark.parametrize("k", [0, 1, 2047, 2049])
def test_triton_xor_at_changes_only_the_named_elements(words, k):
    rng = np.random.default_rng(k)
    base = rng.integers(np.iinfo(words).min, np.iinfo(words).max, 5000, dtype=words)
    index = np.sort(rng.choice(base.size, k, replace=False)).astype(np.int64)
    bits = rng.integers(np.iinfo(words).min, np.iinfo(words).max, k, dtype=words)
    want = base.copy()
    want[index] = np.bitwise_xor(want[index], bits)
    got = torch.from_numpy(base.copy())
    triton_ops.xor_at_(got, torch.from_numpy(index), torch.from_numpy(bits))
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8), (3, 96), (5, 1000)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_rms_norm(dtype, shape, with_residual):
    x, w, r = values(shape, dtype, 14), values(shape[-1:], dtype, 15), values(shape, dtype, 16)
    want, want_sum = reference.rms_norm(pd(x, dtype), pd(w, dtype), 1e-5, pd(r, dtype) if with_residual else None)
    out = torch.empty(shape, dtype=getattr(torch, dtype))
    res = th(r, dtype) if with_residual else None
    triton_ops.rms_norm(th(x, dtype), th(w, dtype), 1e-5, out, res, res)  # residual_out overwrites residual
    close(f32(out), f32(want), dtype)
    if with_residual:
        close(f32(res), f32(want_sum), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,heads,kv_heads,dim", [(1, 1, 1, 1, 2), (2, 5, 4, 2, 16), (1, 9, 6, 3, 10)])
def test_rotary_reference_against_numpy_and_triton_against_reference(dtype, batch, seq, heads, kv_heads, dim):
    q, k = values((batch, seq, heads, dim), dtype, 17), values((batch, seq, kv_heads, dim), dtype, 18)
    cos, sin = rope_tables(seq, dim // 2)
    wq, wk = pd(q, dtype), pd(k, dtype)
    reference.rotary_(wq, wk, paddle.to_tensor(cos), paddle.to_tensor(sin))
    close(f32(wq), np_rotary(q, cos, sin), dtype)
    close(f32(wk), np_rotary(k, cos, sin), dtype)
    gq, gk = th(q, dtype), th(k, dtype)
    triton_ops.rotary_(gq, gk, torch.from_numpy(cos), torch.from_numpy(sin))
    close(f32(gq), f32(wq), dtype)
    close(f32(gk), f32(wk), dtype)


@pytest.mark.parametrize("batch,seq,heads,kv_heads,dim", [(1, 1, 1, 1, 2), (2, 5, 4, 2, 16), (1, 9, 6, 3, 10)])
def test_cpu_rotary_in_place_has_the_bits_of_the_trainers_rotary(batch, seq, heads, kv_heads, dim):
    """The server rotates q and k in place with the compiled loop, the trainer out of place in Paddle ops: the
    same bits, or a served logprob would differ from the trainer's."""
    q, k = values((batch, seq, heads, dim), "float32", 19), values((batch, seq, kv_heads, dim), "float32", 20)
    cos, sin = (paddle.to_tensor(t) for t in rope_tables(seq, dim // 2))
    want_q, want_k = reference.rotary(pd(q, "float32"), pd(k, "float32"), cos, sin)
    got_q, got_k = pd(q, "float32"), pd(k, "float32")
    cpu_attention.rotary_(got_q, got_k, cos, sin)
    np.testing.assert_array_equal(got_q.numpy(), want_q.numpy())
    np.testing.assert_array_equal(got_k.numpy(), want_k.numpy())
    assert not np.array_equal(got_q.numpy(), q) or seq == 1  # it rotated (position 0 alone is the identity)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 3, 1001)])
def test_triton_swiglu(dtype, shape):
    g, u = values(shape, dtype, 19, 3.0), values(shape, dtype, 20)
    want = reference.swiglu(pd(g, dtype), pd(u, dtype))
    out = torch.empty(shape, dtype=getattr(torch, dtype))
    triton_ops.swiglu(th(g, dtype), th(u, dtype), out)
    close(f32(out), f32(want), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,heads,kv_heads,dim,max_len", [(1, 1, 1, 8, 4), (2, 4, 2, 16, 70), (3, 6, 2, 10, 150)])
def test_decode_attention_reference_against_numpy_and_triton_against_reference(
        dtype, batch, heads, kv_heads, dim, max_len):
    q = values((batch, heads, dim), dtype, 21)
    k, v = values((batch, max_len, kv_heads, dim), dtype, 22), values((batch, max_len, kv_heads, dim), dtype, 23)
    lengths = np.random.default_rng(24).integers(1, max_len + 1, batch)
    pages = batch * -(-max_len // reference.PAGE) + 2
    table = page_table(batch, max_len, pages, 25)
    kp, vp = paged(k, table, pages), paged(v, table, pages)
    want = reference.decode_attention(pd(q, dtype), pd(kp, dtype), pd(vp, dtype), pd(table, "int64"),
                                      pd(lengths, "int64"), dim**-0.5)
    for b in range(batch):
        close(f32(want)[b : b + 1], np_decode_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], lengths[b],
                                                        dim**-0.5), dtype)
    out = torch.empty((batch, heads, dim), dtype=getattr(torch, dtype))
    triton_ops.decode_attention(th(q, dtype), th(kp, dtype), th(vp, dtype), torch.from_numpy(table),
                                torch.from_numpy(lengths), dim**-0.5, out)
    close(f32(out), f32(want), dtype)


def test_triton_launchers_reject_bad_shapes():
    with pytest.raises(ValueError, match="does not fit"):
        triton_ops.cast_copy_(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="group"):
        triton_ops.decode_attention(torch.zeros(1, 3, 8), torch.zeros(2, 4, 16, 8), torch.zeros(2, 4, 16, 8),
                                    torch.ones(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64), 1.0,
                                    torch.zeros(1, 3, 8))
    with pytest.raises(ValueError, match="contiguous"):
        triton_ops.swiglu(torch.zeros(4, 4).t(), torch.zeros(4, 4), torch.zeros(4, 4))


# ---- the dispatcher and the GPU check script ---------------------------------------------------------------


def test_dispatcher_runs_the_reference_on_cpu_tensors():
    import kernels

    dst = paddle.zeros([4, 3], dtype="bfloat16")
    assert kernels.backend(dst) == "reference"
    kernels.cast_copy_(dst, paddle.ones([4, 3]))
    assert f32(dst).tolist() == [[1.0] * 3] * 4
    with pytest.raises(ValueError, match="cannot be written into"):
        kernels.cast_copy_(dst, paddle.ones([3, 4]))


GPU_CHECK = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def gpu_check(tmp_path: Path, *args: str, before: str = "") -> tuple[str, dict]:
    """``bench/gpu_check.py --smoke`` in a fresh interpreter under ``TRITON_INTERPRET=1``, after running ``before``
    there (to take a framework away or break a check): its output and its JSON."""
    out = tmp_path / "gpu.json"
    argv = ["gpu_check.py", "--smoke", "--out", str(out), *args]
    code = f"import runpy, sys\n{before}\nsys.argv = {argv!r}\nrunpy.run_path({str(GPU_CHECK)!r}, run_name='__main__')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.exists(), run.stdout + run.stderr
    return run.stdout, json.loads(out.read_text())


def test_gpu_check_script_runs_under_the_interpreter(tmp_path):
    """The script a GPU host runs, on CPU tensors: every kernel matches the Paddle oracle, decode runs, and so does
    every Paddle check this CPU build can run."""
    stdout, result = gpu_check(tmp_path)
    assert "oracle: Baton's Paddle reference on cpu" in stdout
    kernels_run = [name for name in result if name.startswith("kernel_")]
    assert len(kernels_run) == 5 and all(result[name]["ok"] for name in kernels_run)
    assert result["decode"]["tokens_per_s"]["batch 1"] > 0
    for name in ("engine_float32", "engine_bfloat16", "tp2_update", "tp2_update_bf16", "device_digest",
                 "cast_copy_2g"):
        assert result[name]["ok"], (name, result[name])
    assert result["delta_update"]["load_path"] == "delta" and result["delta_update"]["ok"]
    assert "skipped" in result["stream_of"]  # no CUDA place in a CPU build
    assert stdout.splitlines()[-1].startswith("VERDICT: PASS")


def test_gpu_check_reaches_its_verdict_when_a_paddle_check_raises(tmp_path):
    before = ("import infer.digest\n"
              "def broken(*args, **kwargs):\n    raise RuntimeError('forced by the test')\n"
              "infer.digest.device_sums = broken")
    stdout, result = gpu_check(tmp_path, "--checks", "device_digest,tp2_update", before=before)
    assert result["device_digest"]["ok"] is False and "forced by the test" in result["device_digest"]["error"]
    assert result["tp2_update"]["ok"]  # the checks after it still ran
    assert stdout.splitlines()[-1].startswith("VERDICT: FAIL") and "device_digest" in stdout.splitlines()[-1]


def test_gpu_check_runs_without_torch_and_without_paddle(tmp_path):
    """A Paddle GPU host may have no torch; the lent GPU host has no Paddle: each runs what it can and says so."""
    stdout, result = gpu_check(tmp_path, "--checks", "kernels,device_digest", before="sys.modules['torch'] = None")
    assert "torch is not installed" in result["kernels"]["skipped"] and result["device_digest"]["ok"]
    assert stdout.splitlines()[-1].startswith("VERDICT: PASS")
    stdout, result = gpu_check(tmp_path, "--checks", "kernels,device_digest", before="sys.modules['paddle'] = None")
    assert "Paddle is not installed" in result["paddle"]["skipped"] and "torch formulas" in result["oracle"]["label"]
    assert all(result[name]["ok"] for name in result if name.startswith("kernel_"))
    assert stdout.splitlines()[-1].startswith("VERDICT: PASS")


def test_the_machine_fingerprint_names_what_row_bits_rest_on():
    from kernels import gemm

    x = paddle.to_tensor(np.ones((3, 40), np.float32))
    kernels.matmul(x, paddle.to_tensor(np.ones((40, 24), np.float32)))
    mine = kernels.fingerprint()
    assert mine["blas"].split()[0] in ("openblas", "mkl", "blis") and mine["row_thresholds"]["40x24"] >= 1
    assert kernels.same_machine(mine, mine | {"row_thresholds": {}})  # shapes only one side measured do not count
    assert not kernels.same_machine(mine, mine | {"blas_core": "another core"})
    assert not kernels.same_machine(mine, mine | {"row_thresholds": {"40x24": gemm.MAX_ROWS + 1}})
