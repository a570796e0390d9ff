"""The model's linears and LM head on CPU: GEMMs through the OpenBLAS numpy ships with, batch-invariantly.

Why numpy: this Paddle CPU build's GEMM is 2-2.5x slower than numpy's OpenBLAS at the sizes a decode step runs
(the 56 GEMMs of the ``small`` model at 8-64 rows, weights out of cache, conversions included). Tensors cross
by DLPack, so no weight is copied.

Why ``min_rows``: a BLAS computes a row differently when few rows come with it (OpenBLAS: a GEMV for one row, a
small-matrix kernel while M*N*K is small), and a served token must get the bits the trainer's full forward
gives it. Above a threshold that depends on the shape and the CPU's kernels, every row comes out the same
whatever the row count, so each GEMM runs on at least ``min_rows`` rows (padded), measured once per shape on
the machine itself, in blocks of at most ``MAX_ROWS``.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import paddle
from threadpoolctl import threadpool_limits

# Rows per GEMM call: longer forwards (a trainer's) run in blocks, so a row meets the same kernel however many
# rows there are.
MAX_ROWS = 128
# Columns the threshold is measured on: fewer than a wide LM head has (its measure stays cheap); fewer columns
# only raise the threshold (OpenBLAS's small-matrix choice grows with M*N*K), so it errs on the safe side.
PROBE_COLUMNS = 2048


def use_every_core() -> None:
    """Paddle sets ``OMP_NUM_THREADS=1`` when it is imported and the variable is unset, and OpenBLAS takes its
    thread count from it when numpy loads it: ``baton serve`` got one BLAS thread that way, and about 0.85x the
    tokens/s over HTTP. So every core this process may use, unless ``OPENBLAS_NUM_THREADS`` says otherwise. A
    row's bits do not depend on the thread count (checked in ``tests/test_kernels.py``)."""
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        threadpool_limits(len(os.sched_getaffinity(0)), user_api="blas")


use_every_core()


def _numpy(t: paddle.Tensor) -> np.ndarray:
    return np.from_dlpack(t.detach()) if t.is_contiguous() else t.numpy()


def _tracked(*xs: paddle.Tensor) -> bool:
    return paddle.is_grad_enabled() and not all(x.stop_gradient for x in xs)


@functools.cache
def min_rows(n_in: int, n_out: int, transpose_y: bool = False) -> int:
    """The fewest rows from which every row of ``[M, n_in] @ [n_in, n_out]`` equals the same row computed in a
    block of ``MAX_ROWS``, for every M up to ``MAX_ROWS``."""
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


def _blocks(x: np.ndarray, w: np.ndarray, threshold: int) -> np.ndarray:
    rows = x.shape[0]
    out = np.empty((rows, w.shape[1]), np.float32)
    for start in range(0, rows, MAX_ROWS):
        block = x[start : start + MAX_ROWS]
        if block.shape[0] >= threshold:
            np.matmul(block, w, out=out[start : start + MAX_ROWS])
        else:  # too few rows for the shared path: pad, then keep the real ones
            padded = np.zeros((threshold, x.shape[1]), np.float32)
            padded[: block.shape[0]] = block
            out[start:] = (padded @ w)[: block.shape[0]]
    return out


def _forward(x: paddle.Tensor, w: paddle.Tensor, transpose_y: bool, invariant: bool) -> paddle.Tensor:
    xn, wn = _numpy(x), _numpy(w)
    wn = wn.T if transpose_y else wn
    if invariant:
        y = _blocks(xn, wn, min_rows(wn.shape[0], wn.shape[1], transpose_y))
    else:
        y = xn @ wn
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
