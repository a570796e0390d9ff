"""The engine's KV cache: a fixed pool of pages that sequences borrow, so memory is bounded up front and a full
pool makes new requests wait instead of growing.

Each layer keeps keys and values in pages of ``kernels.PAGE`` tokens, laid out for the device's attention kernel
(``kernels.new_kv_pages``). A sequence
owns a list of pages; the samples of one prompt share the prompt's full pages (reference counts) and each gets a
copy of the last, partly filled one. Page 0 is never handed out: it pads page tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import paddle

import kernels
from infer.config import ModelConfig

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_dtype(model_dtype: str, place) -> str:
    """The KV cache's dtype for a model on ``place``: the model's on a GPU (a bf16 model's cache costs half a
    float32 one), float32 on the CPU, where the compiled attention kernel reads float32 pages
    (``kernels.cpu_attention``)."""
    return "float32" if place.is_cpu_place() else model_dtype


def pages_for(tokens: int) -> int:
    return -(-tokens // kernels.PAGE)


class KVPool:
    def __init__(self, config: ModelConfig, pages: int, dtype: str = "float32", place=None):
        if pages < 2:
            raise ValueError(f"a KV cache needs at least 2 pages of {kernels.PAGE} tokens, got {pages}")
        place = place if place is not None else paddle.CPUPlace()
        layers = [kernels.new_kv_pages(config.kv_heads, pages, config.head_dim, dtype, place)
                  for _ in range(config.layers)]
        self.place = place
        self.dtype = dtype
        self.k, self.v = [k for k, _ in layers], [v for _, v in layers]
        self.pages = pages
        self._refs = np.zeros(pages, np.int32)
        self._free = list(range(pages - 1, 0, -1))

    @staticmethod
    def page_bytes(config: ModelConfig, dtype: str = "float32") -> int:
        return 2 * config.layers * config.kv_heads * kernels.PAGE * config.head_dim * ITEMSIZE[dtype]

    @property
    def capacity(self) -> int:
        return self.pages - 1

    @property
    def free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"KV cache: {count} pages asked, {len(self._free)} free")  # the scheduler checks first
        taken = [self._free.pop() for _ in range(count)]
        self._refs[taken] = 1
        return taken

    def share(self, pages: list[int]) -> list[int]:
        self._refs[pages] += 1
        return list(pages)

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)

    def copy_page(self, src: int, dst: int) -> None:
        for pool in (*self.k, *self.v):
            pool[:, dst] = pool[:, src]


@dataclass
class Group:
    """Rows ``start .. start + T*G`` of a step that attend together: G decoding sequences (T = 1), or one
    sequence's prefill chunk (G = 1)."""

    start: int
    page_table: np.ndarray  # [G, nb]
    positions: np.ndarray  # [G, T]


class PagedStep:
    """The attention context of one engine step: writes every row's key and value into its page slot, then
    attends each group over its sequences' pages. What is the same in every layer (the plans) is built once,
    here."""

    def __init__(self, pool: KVPool, slots: np.ndarray, groups: list[Group], heads: int):
        self.pool = pool
        kv_heads = pool.v[0].shape[0]
        self.slots = slots.astype(np.int64)
        self.groups = [(g.start, g.positions.shape, kernels.Plan.build(g.positions, heads, kv_heads,
                                                                       g.page_table.shape[1] * kernels.PAGE,
                                                                       g.page_table, pool.pages, place=pool.place))
                       for g in groups]

    def __call__(self, layer: int, q, k, v, scale: float) -> paddle.Tensor:
        kernels.store_kv(self.pool.k[layer], self.pool.v[layer], k, v, self.slots)
        outs = []
        for start, (count, t), plan in self.groups:
            rows = q[start : start + count * t].reshape([count, t, *q.shape[1:]])
            out = kernels.paged_attention(rows, self.pool.k[layer], self.pool.v[layer], plan, scale)
            outs.append(out.reshape([count * t, *q.shape[1:]]))
        return paddle.concat(outs) if len(outs) > 1 else outs[0]
