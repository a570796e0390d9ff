"""Reading delta versions: a version's chain from its nearest full version, a delta applied onto targets that hold
its base, the result checked against the version's digest, and a rank read as whole tensors through its chain.

A delta applies only to the exact bytes of its base, so the base is proven, never assumed: by the target's digest
(``storage.digest``) against the one the delta records, and down a chain by each manifest's digest against the
next delta's record of it. After applying, the target's digest must equal the version's own, so a delta that
decodes to anything but the published state is caught before it is served, whatever the files' checksums say.
Which sources a load takes (``load_plan``) and applying them in order (``apply_plan``) is ``storage.reader``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from math import prod
from typing import Any

import numpy as np

from . import deltacodec
from .digest import state_digest, sums_digest, tensor_sums
from .errors import PartialApplyError, SnapshotNotFoundError, TornSnapshotError
from .resolve import Source, read_manifest, resolve
from .tensorfile import DTYPE_CODES, code_of_paddle, copy_converted, host_bytes, host_view, itemsize

XorFn = Callable[[Any, np.ndarray, np.ndarray], None]  # (target, changed indices, XOR words): kernels.xor_at_
# (targets, the snapshot's name -> (dtype code, shape)) -> their sum64 digest computed where they live, or None
DigestFn = Callable[[Mapping[str, Any], Mapping[str, tuple[str, tuple[int, ...]]]], str | None]

MAX_CHAIN_LINKS = 64  # deltas a reader follows before calling a chain broken (publishers close theirs far sooner)


def resolve_chain(snapshot_root: str, version: str, rank: int, *, strict: bool = False,
                  storage_options: dict[str, Any] | None = None, first: Source | None = None) -> list[Source]:
    """``version``'s sources from the nearest full version to itself, each delta's base checked by digest."""
    src = first or resolve(snapshot_root, version, rank, strict=strict, storage_options=storage_options)
    chain = [src]
    while chain[-1].is_delta:
        delta = chain[-1].manifest
        if len(chain) > MAX_CHAIN_LINKS:
            raise TornSnapshotError(chain[0].urls()[0], f"a chain of over {MAX_CHAIN_LINKS} deltas: publish a full "
                                    "version")
        try:
            base = resolve(snapshot_root, delta.base.version, rank, strict=True, storage_options=storage_options)
        except SnapshotNotFoundError as exc:
            raise SnapshotNotFoundError(f"{delta.base.version} tp{rank}", [
                f"{version} is a delta on {delta.base.version!r}, which is not under {snapshot_root} (pruned?): "
                f"load {version} into a server that holds {delta.base.version}, or publish {version} as a full "
                "version (without base)", *exc.checked]) from None
        if base.manifest is None or base.manifest.digest != delta.base.digest:
            raise TornSnapshotError(base.urls()[0], f"is not the base {delta.version} was published on (its digest "
                                    f"differs from the one the delta records: republished?); publish {version} again")
        chain.append(base)
    return chain[::-1]


def holds_base(src: Source, targets: Mapping[str, Any], base_digest: str | None = None,
               held_sums: Mapping[str, int] | None = None, *, snapshot_root: str | None = None,
               storage_options: dict[str, Any] | None = None, found_sums: dict[str, int] | None = None) -> bool:
    """Whether ``targets`` hold delta ``src``'s base: ``base_digest`` when the caller knows their digest, else their
    ``held_sums`` (each tensor's ``sum64`` as the caller knows it) against the base manifest's ``sum64`` (one small
    read under ``snapshot_root``), else computed over them: with ``found_sums`` (a dict to fill) their ``sum64``
    against that manifest's, which the apply then advances so the result needs no second pass, else their digest."""
    if base_digest is not None:
        return base_digest == src.manifest.base.digest
    index = src.index()
    base = None
    if snapshot_root is not None and (held_sums is not None or found_sums is not None):
        base = read_manifest(snapshot_root, src.manifest.base.version, src.manifest.rank,
                             storage_options=storage_options)
    by_sums = base is not None and base.digest == src.manifest.base.digest and base.sum64 is not None
    if by_sums and held_sums is not None and set(held_sums) >= set(index):
        return sums_digest(index, held_sums) == base.sum64
    if by_sums and found_sums is not None and _fits(targets, index):
        found_sums.update(tensor_sums(targets, index))
        if sums_digest(index, found_sums) == base.sum64:
            return True
        found_sums.clear()
        return False
    return state_digest(targets, index) == src.manifest.base.digest


def _fits(targets: Mapping[str, Any], index: Mapping[str, tuple[str, tuple[int, ...]]]) -> bool:
    """Whether ``targets`` have exactly ``index``'s names and shapes (else they hold no version of it)."""
    return set(targets) == set(index) and all(tuple(int(d) for d in targets[n].shape) == tuple(shape)
                                              for n, (_, shape) in index.items())


def _xor_in_place(dst: Any, code: str, xor_fn: XorFn | None) -> bool:
    """Whether ``xor_fn`` can apply changes straight into ``dst``: a contiguous Paddle tensor of the snapshot's own
    dtype (a cast target holds other bits; a strided view has no flat index)."""
    return xor_fn is not None and not isinstance(dst, np.ndarray) and code_of_paddle(dst.dtype) == code and \
        dst.is_contiguous()


def words_at(dst: Any, index: np.ndarray, width: int) -> np.ndarray:
    """The raw words of Paddle tensor ``dst`` (contiguous, elements of ``width`` bytes) at flat ``index``, gathered
    where it lives: only those words cross to the host."""
    import paddle

    signed = {1: paddle.uint8, 2: paddle.int16, 4: paddle.int32, 8: paddle.int64}[width]
    flat = dst.detach().view(signed).reshape([-1])
    at = paddle.to_tensor(np.ascontiguousarray(index, np.int64), place=dst.place)
    got = paddle.gather(flat, at).numpy()
    return got.view(np.dtype(f"u{width}"))


def apply_delta(src: Source, targets: Mapping[str, Any], *, verify: str = "stream", copy_fn=None,
                xor_fn: XorFn | None = None, touched: list[str] | None = None, bar=None,
                sums: dict[str, int] | None = None) -> None:
    """Applies delta ``src`` to ``targets``, which hold its base: each file is read whole and checked, then its
    changes are XORed into the targets' own memory: on the host directly, on a device by ``xor_fn`` with only the
    changes sent there, else into a copy written back (a cast or a strided view). Failure after the first write is
    a ``PartialApplyError``. ``sums`` (each target's ``sum64`` before, as ``src``'s dtypes) is advanced in place from
    the changed elements alone: their old words are read at the changed positions before the XOR."""
    touched = [] if touched is None else touched
    tensors = src.manifest.tensors
    url = src.urls()[0]
    try:
        for i, header in enumerate(src.headers):
            url = src.urls()[i]
            data = memoryview(src.read(i, verify=verify != "none"))
            here = {}  # the file's tensors whose memory is on the host: applied together, on both cores
            for e in header.entries:
                code, shape = tensors[e.name].dtype, tensors[e.name].shape
                dst = targets[e.name]
                view = host_view(dst, code) if copy_fn is None else None
                if view is not None:
                    here[e.name] = (view, data[e.start:e.end], itemsize(code))
                    continue
                if _xor_in_place(dst, code, xor_fn):
                    index, xors = deltacodec.changes(data[e.start:e.end], prod(shape), itemsize(code))
                    old = words_at(dst, index, itemsize(code)) if sums is not None else None
                    touched.append(e.name)
                    xor_fn(dst, index, xors)
                    change = deltacodec.weighed_change(index, old, xors, itemsize(code)) if sums is not None else 0
                else:
                    touched.append(e.name)
                    values = host_bytes(dst, code)
                    change = deltacodec.apply(values, data[e.start:e.end], itemsize(code), sums is not None)
                    copy_converted(dst, values, code, shape, copy_fn)
                if sums is not None:
                    sums[e.name] = (sums[e.name] + change) % 2**64
            touched += here  # any of them may be written from here on
            for name, change in deltacodec.apply_many(here, sums is not None).items():
                if sums is not None:
                    sums[name] = (sums[name] + change) % 2**64
            if bar is not None:
                bar.update(sum(e.nbytes for e in header.entries))
    except Exception as exc:
        if isinstance(exc, deltacodec.DeltaFormatError):
            exc = TornSnapshotError(url, f"does not decode: {exc} (corrupt or forged); publish the version again")
        if not touched:
            raise exc from None
        raise PartialApplyError(str(exc), touched) from exc


def check_result(src: Source, targets: Mapping[str, Any], touched: list[str], digest_fn: DigestFn | None = None,
                 sums: Mapping[str, int] | None = None) -> str:
    """The targets' digest, which must be the version's own (``src`` the last source applied); returns it. With
    ``sums`` (each target's ``sum64``, advanced by the apply from the changed elements) and a manifest that records
    ``sum64``, their ``sum64`` digest is compared and the version's digest returned: O(changed), no pass over the
    targets. Else with ``digest_fn`` the targets' ``sum64`` digest is computed where they live (a device's weights
    are not copied out to be hashed) and returned; else their digest is hashed over every tensor."""
    want, got = src.manifest.digest, None
    if sums is not None and src.manifest.sum64 is not None:
        got = sums_digest(src.index(), sums)
        if got != src.manifest.sum64:
            raise PartialApplyError(f"{src.urls()[0]}: the weights after applying have sum64 digest {got}, the "
                                    f"version's manifest says {src.manifest.sum64} (a target that did not hold the "
                                    "base, or a corrupt delta): publish it again", list(targets))
        return src.manifest.digest
    if digest_fn is not None and src.manifest.sum64 is not None:
        want, got = src.manifest.sum64, digest_fn(targets, src.index())
    if got is None:
        want, got = src.manifest.digest, state_digest(targets, src.index())
    if got != want:
        raise PartialApplyError(f"{src.urls()[0]}: the weights after applying digest to {got}, the version's manifest "
                                f"says {want}: publish it again", list(targets))
    return got


class RankReader:
    """One rank of a version as whole tensors, read through its chain (the full version's part, then each delta's
    change), every file checked against its manifest before use. About one part of each link in memory."""

    def __init__(self, chain: list[Source]):
        self.chain = chain
        self.where = [{e.name: (i, e) for i, h in enumerate(s.headers) for e in h.entries} for s in chain]
        self.held: list[tuple[int, Any] | None] = [None] * len(chain)

    @property
    def index(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return self.chain[-1].index()

    def _file(self, link: int, i: int):
        if self.held[link] is None or self.held[link][0] != i:
            self.held[link] = (i, self.chain[link].read(i))
        return self.held[link][1]

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes at this version, a fresh writable flat uint8 array."""
        i, e = self.where[0][name]
        out = np.frombuffer(self._file(0, i), np.uint8, e.nbytes, e.start).copy()
        for link in range(1, len(self.chain)):
            found = self.where[link].get(name)
            if found is not None:
                i, d = found
                try:
                    deltacodec.apply(out, memoryview(self._file(link, i))[d.start:d.end], itemsize(e.dtype))
                except deltacodec.DeltaFormatError as exc:
                    raise TornSnapshotError(self.chain[link].urls()[i], f"does not decode: {exc}") from None
        return out

    def tensor(self, name: str) -> np.ndarray:
        code, shape = self.index[name]
        return self.raw(name).view(DTYPE_CODES[code][0]).reshape(shape)
