"""The model's linears and LM head on CPU: GEMMs through the OpenBLAS numpy ships with, batch-invariantly.

Why numpy: at the sizes a decode step runs (8-64 rows, weights out of cache), numpy's OpenBLAS is faster than this
Paddle CPU build's GEMM (``bench/model_bench.py``). Tensors cross by DLPack, so no weight is copied.

Why ``min_rows``: a BLAS computes a row differently when few rows come with it (OpenBLAS: a GEMV for one row, a
small-matrix kernel while M*N*K is small), and a served token must get the bits the trainer's full forward
gives it. Above a threshold that depends on the shape and the CPU's kernels, every row comes out the same
whatever the row count, so each GEMM runs on at least ``min_rows`` rows, measured once per shape on the
machine itself, in blocks of at most ``MAX_ROWS``.

Why ``blas_order``: padding one row to the threshold costs a single stream several GEMVs' time (OpenBLAS's
GEMM kernel at 2-8 rows, weights packed on every call). OpenBLAS's GEMM kernel sums each output over K in
order with fused multiply-adds, K cut into blocks whose sums are then added in order. A compiled loop doing the
same gives those rows' bits at about GEMV speed; it is used only for shapes where it reproduced the BLAS bit for
bit on probe rows (checked once per shape here), and rows are padded as before elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import os

import numba
import numpy as np
import paddle
from llvmlite import ir
from numba.extending import intrinsic
from threadpoolctl import threadpool_limits

from kernels.sizes import MAX_ROWS

# Columns the threshold is measured on: fewer than a wide LM head has (its measure stays cheap); fewer columns
# only raise the threshold (OpenBLAS's small-matrix choice grows with M*N*K), so it errs on the safe side.
PROBE_COLUMNS = 2048


def use_every_core() -> None:
    """Paddle sets ``OMP_NUM_THREADS=1`` when it is imported and the variable is unset, and OpenBLAS takes its
    thread count from it when numpy loads it, which would leave a server on one BLAS thread. So every core this
    process may use, unless ``OPENBLAS_NUM_THREADS`` says otherwise; called by whoever runs the model (the engine,
    a trainer), never on import. A row's bits do not depend on the thread count (``tests/test_kernels.py``)."""
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        threadpool_limits(len(os.sched_getaffinity(0)), user_api="blas")


def _numpy(t: paddle.Tensor) -> np.ndarray:
    return np.from_dlpack(t.detach()) if t.is_contiguous() else t.numpy()


def _tracked(*xs: paddle.Tensor) -> bool:
    return paddle.is_grad_enabled() and not all(x.stop_gradient for x in xs)


MEASURED: dict[str, int] = {}  # "n_in x n_out[ T]" -> the row threshold measured on this machine


def shape_key(n_in: int, n_out: int, transpose_y: bool) -> str:
    return f"{n_in}x{n_out}{' T' if transpose_y else ''}"


def fingerprint() -> dict:
    """What a CPU row's bits rest on: the BLAS build numpy runs (library, version, the core type it picked) and
    the row thresholds measured so far. Two processes whose fingerprints agree (``same_machine``) compute a row
    the same way; the train/infer parity Baton shows holds between those, and is not claimed between others."""
    from threadpoolctl import threadpool_info

    blas = next((i for i in threadpool_info() if i.get("user_api") == "blas"), {})
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   "")
    return {"blas": f"{blas.get('internal_api', '?')} {blas.get('version', '?')}",
            "blas_core": blas.get("architecture"), "cpu": cpu, "row_thresholds": dict(MEASURED)}


def same_machine(a: dict, b: dict) -> bool:
    """Whether two fingerprints compute rows alike: one BLAS build, core type and CPU, and the same threshold for
    every shape both measured."""
    same = all(a.get(k) == b.get(k) for k in ("blas", "blas_core", "cpu"))
    ta, tb = a.get("row_thresholds") or {}, b.get("row_thresholds") or {}
    return same and all(ta[k] == tb[k] for k in ta.keys() & tb.keys())


@functools.cache
def min_rows(n_in: int, n_out: int, transpose_y: bool = False) -> int:
    """The fewest rows from which every row of ``[M, n_in] @ [n_in, n_out]`` equals the same row computed in a
    block of ``MAX_ROWS``, for every M up to ``MAX_ROWS``."""
    MEASURED[shape_key(n_in, n_out, transpose_y)] = rows = _measure(n_in, n_out, transpose_y)
    return rows


def _measure(n_in: int, n_out: int, transpose_y: bool) -> int:
    rng = np.random.default_rng(0)
    cols = min(n_out, PROBE_COLUMNS)
    x = rng.standard_normal((MAX_ROWS, n_in), np.float32)
    w = rng.standard_normal((cols, n_in) if transpose_y else (n_in, cols), np.float32)
    w = w.T if transpose_y else w
    full = x @ w
    for m in range(MAX_ROWS - 1, 0, -1):
        if not np.array_equal(x[:m] @ w, full[:m]):
            return m + 1
    return 1


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (LLVM's fma, a vfmadd on x86), as the BLAS kernels compute."""
    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        return builder.call(builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32] * 3)),
                            args)
    return numba.float32(numba.float32, numba.float32, numba.float32), codegen


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _in_blas_order(x, w, splits, out):  # pragma: no cover - compiled
    """``out = x @ w`` for a few rows: per output, a chain of fused multiply-adds over each K block in order,
    the blocks' sums added in order (OpenBLAS's GEMM kernel). Weight rows are read once, in order, and the
    column loop is the SIMD one, over whole rows: sliced views of column ranges would not vectorize."""
    rows, cols = x.shape[0], w.shape[1]
    acc = np.empty((rows, cols), np.float32)
    for b in range(splits.shape[0] - 1):
        acc[:] = 0
        for k in range(splits[b], splits[b + 1]):
            wk = w[k]
            for r in range(rows):
                xk, a = x[r, k], acc[r]
                for j in range(cols):
                    a[j] = _fma(xk, wk[j], a[j])
        for r in range(rows):
            for j in range(cols):
                out[r, j] = acc[r, j] if b == 0 else out[r, j] + acc[r, j]


_LANES = 16  # outputs a transposed weight's loop computes together (a gather per k)


@numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _in_blas_order_t(x, w, splits, out):  # pragma: no cover - compiled
    """``out = x @ w.T`` for a few rows and a ``[n_out, n_in]`` weight (a tied head): the same sums as
    ``_in_blas_order``, 16 outputs at a time, their weight rows read side by side. Parallel over column ranges,
    which this loop (indexed, unlike sliced views) vectorizes."""
    rows, cols = x.shape[0], w.shape[0]
    tiles = (cols + _LANES - 1) // _LANES
    parts = min(tiles, 64)
    for part in numba.prange(parts):
        acc = np.empty(_LANES, np.float32)
        for tile in range(part * tiles // parts, (part + 1) * tiles // parts):
            lo = tile * _LANES
            width = min(_LANES, cols - lo)
            for r in range(rows):
                for b in range(splits.shape[0] - 1):
                    acc[:] = 0
                    if width == _LANES:  # a constant trip count: one SIMD register
                        for k in range(splits[b], splits[b + 1]):
                            xk = x[r, k]
                            for j in range(_LANES):
                                acc[j] = _fma(xk, w[lo + j, k], acc[j])
                    else:
                        for k in range(splits[b], splits[b + 1]):
                            xk = x[r, k]
                            for j in range(width):
                                acc[j] = _fma(xk, w[lo + j, k], acc[j])
                    for j in range(width):
                        out[r, lo + j] = acc[j] if b == 0 else out[r, lo + j] + acc[j]


def _few_rows(x: np.ndarray, w: np.ndarray, splits: np.ndarray, out: np.ndarray) -> None:
    """``out = x @ w`` in OpenBLAS's order; ``w`` ``[n_in, n_out]`` is a weight or a transposed one's view."""
    x = np.ascontiguousarray(x)
    if w.flags.c_contiguous:
        _in_blas_order(x, w, splits, out)
    else:
        _in_blas_order_t(x, np.ascontiguousarray(w.T), splits, out)


def k_splits(n_in: int, block: int, unroll: int) -> np.ndarray:
    """Where OpenBLAS's level-3 driver cuts K: blocks of ``block`` (its GEMM_Q), the last two halved evenly
    (rounded up to ``unroll``) when less than two blocks are left."""
    cuts, done = [0], 0
    while done < n_in:
        left = n_in - done
        if left >= 2 * block:
            left = block
        elif left > block:
            left = (left // 2 + unroll - 1) // unroll * unroll
        done += left
        cuts.append(done)
    return np.array(cuts, np.int64)


# (GEMM_Q, unroll) of OpenBLAS's x86 targets, the one this machine's numpy ships (SkylakeX: 448) first.
_BLAS_BLOCKINGS = [(q, u) for q in (448, 384, 256, 320, 512, 640, 768, 192) for u in (16, 8, 4)]


@functools.cache
def blas_order(n_in: int, n_out: int, transpose_y: bool = False) -> np.ndarray | None:
    """The K cuts with which ``_few_rows`` gives every probe row of ``[M, n_in] @ [n_in, n_out]`` (``w.T`` of a
    ``[n_out, n_in]`` weight with ``transpose_y``) the bits of the same row in a block of ``MAX_ROWS``, or None
    (a BLAS that sums otherwise)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((MAX_ROWS, n_in), np.float32)
    cols = min(n_out, PROBE_COLUMNS)
    w = rng.standard_normal((cols, n_in) if transpose_y else (n_in, cols), np.float32)
    w = w.T if transpose_y else w
    probe = x[[0, 1, MAX_ROWS // 2, MAX_ROWS - 1]]
    want = (x @ w)[[0, 1, MAX_ROWS // 2, MAX_ROWS - 1]]
    got = np.empty_like(want)
    for block, unroll in _BLAS_BLOCKINGS:
        splits = k_splits(n_in, block, unroll)
        _few_rows(probe, w, splits, got)
        if np.array_equal(got, want):
            return splits
    return None


def _blocks(x: np.ndarray, w: np.ndarray, transpose_y: bool) -> np.ndarray:
    rows, (n_in, n_out) = x.shape[0], w.shape
    threshold = min_rows(n_in, n_out, transpose_y)
    out = np.empty((rows, n_out), np.float32)
    for start in range(0, rows, MAX_ROWS):
        block = x[start : start + MAX_ROWS]
        if block.shape[0] >= threshold:
            np.matmul(block, w, out=out[start : start + MAX_ROWS])
        elif (splits := blas_order(n_in, n_out, transpose_y)) is not None:  # probed only where rows are few
            _few_rows(block, w, splits, out[start:])
        else:  # too few rows for the shared path: pad, then keep the real ones
            padded = np.zeros((threshold, n_in), np.float32)
            padded[: block.shape[0]] = block
            out[start:] = (padded @ w)[: block.shape[0]]
    return out


def _forward(x: paddle.Tensor, w: paddle.Tensor, transpose_y: bool, invariant: bool) -> paddle.Tensor:
    xn, wn = _numpy(x), _numpy(w)
    wn = wn.T if transpose_y else wn
    y = _blocks(xn, wn, transpose_y) if invariant else xn @ wn
    return paddle.from_dlpack(y)


class _Matmul(paddle.autograd.PyLayer):
    """The same numpy GEMM in the trainer's forward (so its logits are the server's, bit for bit); the gradient
    is Paddle's."""

    @staticmethod
    def forward(ctx, x, w, transpose_y, invariant):
        ctx.save_for_backward(x, w)
        ctx.transpose_y = transpose_y
        return _forward(x, w, transpose_y, invariant)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensor()
        if ctx.transpose_y:  # y = x @ w.T
            return paddle.matmul(dy, w), paddle.matmul(dy, x, transpose_x=True)
        return paddle.matmul(dy, w, transpose_y=True), paddle.matmul(x, dy, transpose_x=True)


def cpu_matmul(x: paddle.Tensor, w: paddle.Tensor, transpose_y: bool = False, invariant: bool = True) -> paddle.Tensor:
    """``x @ w`` (``x @ w.T`` with ``transpose_y``) for float32 rows ``x`` ``[M, in]`` on CPU. With
    ``invariant`` a row's result does not depend on M; without it (only to measure what that costs) one row
    takes OpenBLAS's faster GEMV."""
    if _tracked(x, w):
        return _Matmul.apply(x, w, transpose_y, invariant)
    return _forward(x, w, transpose_y, invariant)
