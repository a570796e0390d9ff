"""Loading a delta version: the short path into a target that holds its base, or the chain from the nearest full
version into anything else; and reading a version's tensors through its chain without a target.

A delta applies only to the exact bytes of its base, so the base is proven, never assumed: by the target's digest
(``storage.digest``) against the one the delta records, and down a chain by each manifest's digest against the
next delta's record of it. After applying, the target's digest must equal the version's own, so a delta that
decodes to anything but the published state is caught before it is served, whatever the files' checksums say.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from math import prod
from typing import Any

import numpy as np
import xxhash

from . import deltacodec
from .apply import _copy_converted, _host_view, apply_source, check_source, digest_mismatch, target_table
from .digest import combine, tensor_digest
from .errors import PartialApplyError, SnapshotNotFoundError, TornSnapshotError
from .fs import read_whole
from .resolve import Source, resolve
from .tensorfile import DTYPES, code_of_paddle, itemsize

XorFn = Callable[[Any, np.ndarray, np.ndarray], None]  # (target, changed indices, XOR words): kernels.xor_at_
# (targets, the snapshot's name -> (dtype code, shape)) -> their sum64 digest computed where they live, or None
DigestFn = Callable[[Mapping[str, Any], Mapping[str, tuple[str, tuple[int, ...]]]], str | None]

MAX_CHAIN = 64  # deltas a reader follows before calling a chain broken (publishers close theirs far sooner)


def resolve_chain(snapshot_root: str, version: str, rank: int, *, strict: bool = False,
                  storage_options: dict[str, Any] | None = None, first: Source | None = None) -> list[Source]:
    """``version``'s sources from the nearest full version to itself, each delta's base checked by digest."""
    src = first or resolve(snapshot_root, version, rank, strict=strict, storage_options=storage_options)
    chain = [src]
    while chain[-1].is_delta:
        delta = chain[-1].manifest
        if len(chain) > MAX_CHAIN:
            raise TornSnapshotError(chain[0].urls()[0], f"a chain of over {MAX_CHAIN} deltas: publish a full version")
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


def tensor_bytes(dst: Any, code: str) -> np.ndarray:
    """``dst``'s values as ``code``'s raw bytes (flat uint8): its own memory when it can be, else a copy. A target
    of another float dtype holds the snapshot's values cast, and casting back gives the exact bits."""
    view = _host_view(dst, code)
    if view is not None:
        return view
    np_dtype, paddle_name = DTYPES[code]
    if isinstance(dst, np.ndarray):
        if code == "BF16" and dst.dtype != np.uint16:
            return (np.ascontiguousarray(dst, np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(-1)
        return np.ascontiguousarray(dst.astype(np_dtype, copy=False)).reshape(-1).view(np.uint8).copy()
    from .tensorfile import paddle_eager

    paddle = paddle_eager()
    t = dst.detach()
    if str(t.dtype).removeprefix("paddle.") != paddle_name:
        t = t.astype(paddle_name)
    if code == "BF16":
        t = t.view(paddle.uint16)
    elif code.startswith("F8"):
        t = t.view(paddle.uint8)
    return np.ascontiguousarray(t.cpu().numpy()).reshape(-1).view(np.uint8).copy()


def rank_digest(targets: Mapping[str, Any], index: Mapping[str, tuple[str, tuple[int, ...]]]) -> str | None:
    """The digest of ``targets`` read as the snapshot's dtypes (``index``: name -> (code, shape)); None when
    they do not have the snapshot's names and shapes, so cannot hold any version of it."""
    if set(targets) != set(index) or any(tuple(int(d) for d in targets[n].shape) != s for n, (_, s) in index.items()):
        return None
    return combine({n: tensor_digest(n, code, shape, tensor_bytes(targets[n], code)) for n, (code, shape) in index.items()})


def _blob(src: Source, i: int, verify: bool) -> bytes:
    """Delta file ``i`` whole (they are small), checked against the manifest before any of it is used."""
    url = src.urls()[i]
    try:
        data = src.fs.cat_file(src.files[i])
    except FileNotFoundError:
        raise TornSnapshotError(url, "disappeared while loading (pruned or replaced?)") from None
    if len(data) != src.sizes[i]:
        raise TornSnapshotError(url, f"read {len(data)} bytes, expected {src.sizes[i]} (changed while loading?)")
    if verify:
        got = xxhash.xxh3_128(data).hexdigest()
        if got != src.digests[i]:
            raise digest_mismatch(url, got, src.digests[i])
    return data


def _xor_in_place(dst: Any, code: str, xor_fn: XorFn | None) -> bool:
    """Whether ``xor_fn`` can apply changes straight into ``dst``: a contiguous Paddle tensor of the snapshot's own
    dtype (a cast target holds other bits; a strided view has no flat index)."""
    return xor_fn is not None and not isinstance(dst, np.ndarray) and code_of_paddle(dst.dtype) == code and \
        dst.is_contiguous()


def apply_delta(src: Source, targets: Mapping[str, Any], *, verify: str = "stream", copy_fn=None,
                xor_fn: XorFn | None = None, touched: list[str] | None = None, bar=None) -> None:
    """Applies delta ``src`` to ``targets``, which hold its base: each file is read whole and checked, then its
    changes are XORed into the targets' own memory: on the host directly, on a device by ``xor_fn`` with only the
    changes sent there, else into a copy written back (a cast or a strided view). Failure after the first write is
    a ``PartialApplyError``."""
    touched = [] if touched is None else touched
    tensors = src.manifest.tensors
    url = src.urls()[0]
    try:
        for i, header in enumerate(src.headers):
            url = src.urls()[i]
            data = _blob(src, i, verify != "none")
            for e in header.entries:
                code, shape = tensors[e.name].dtype, tensors[e.name].shape
                dst = targets[e.name]
                view = _host_view(dst, code) if copy_fn is None else None
                if view is None and _xor_in_place(dst, code, xor_fn):
                    index, xors = deltacodec.changes(memoryview(data)[e.start:e.end], prod(shape), itemsize(code))
                    touched.append(e.name)
                    xor_fn(dst, index, xors)
                    if bar is not None:
                        bar.update(e.nbytes)
                    continue
                values = view if view is not None else tensor_bytes(dst, code)
                touched.append(e.name)
                deltacodec.apply(values, memoryview(data)[e.start:e.end], itemsize(code))
                if view is None:
                    _copy_converted(dst, values, code, shape, copy_fn)
                if bar is not None:
                    bar.update(e.nbytes)
    except Exception as exc:
        if isinstance(exc, deltacodec.DeltaFormatError):
            exc = TornSnapshotError(url, f"does not decode: {exc} (corrupt or forged); publish the version again")
        if not touched:
            raise exc from None
        raise PartialApplyError(str(exc), touched) from exc


def check_result(src: Source, targets: Mapping[str, Any], touched: list[str], digest_fn: DigestFn | None = None) -> str:
    """The targets' digest, which must be the version's own (``src`` the last source applied); returns it. With
    ``digest_fn`` and a manifest that records ``sum64``, the targets' ``sum64`` digest is computed where they live
    (a device's weights are not copied out to be hashed) and returned instead."""
    want, got = src.manifest.digest, None
    if digest_fn is not None and src.manifest.sum64 is not None:
        want, got = src.manifest.sum64, digest_fn(targets, src.index())
    if got is None:
        want, got = src.manifest.digest, rank_digest(targets, src.index())
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
            src = self.chain[link]
            if link == 0:
                data = read_whole(src.fs, src.files[i])
                if src.digests[i]:
                    got = xxhash.xxh3_128(data).hexdigest()
                    if got != src.digests[i]:
                        raise digest_mismatch(src.urls()[i], got, src.digests[i])
            else:
                data = _blob(src, i, True)
            self.held[link] = (i, data)
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
        return self.raw(name).view(DTYPES[code][0]).reshape(shape)


def load_plan(snapshot_root: str, version: str, rank: int, targets: Mapping[str, Any] | None, *,
              base_digest: str | None = None, fallback_dir: str | None = None, strict: bool = False,
              storage_options: dict[str, Any] | None = None) -> list[Source]:
    """The sources that take ``targets`` to ``version``, in order: the version's own (a full version, or a delta
    when the targets hold its base: ``base_digest`` when the caller knows their digest, else computed), or the
    chain from the nearest full version."""
    src = resolve(snapshot_root, version, rank, fallback_dir=fallback_dir, strict=strict,
                  storage_options=storage_options)
    if not src.is_delta:
        return [src]
    if targets is not None:
        held = base_digest if base_digest is not None else rank_digest(targets, src.index())
        if held == src.manifest.base.digest:
            return [src]
    return resolve_chain(snapshot_root, version, rank, storage_options=storage_options, first=src)


def describe(plan: list[Source]) -> str:
    """How a plan loads: what ``LoadReport.path``, the server's reply and its metrics say."""
    if not plan[-1].is_delta:
        return "full"
    return "delta" if len(plan) == 1 else f"chain of {len(plan) - 1} deltas from {plan[0].manifest.version}"


def apply_plan(plan: list[Source], into: Any, *, verify: str = "stream", cast: bool = False, copy_fn=None,
               xor_fn: XorFn | None = None, digest_fn: DigestFn | None = None, prefetch: int = 8,
               progress: bool = False, label: str = "load") -> tuple[dict[str, Any], str, str | None]:
    """Applies each source of ``plan`` in order; returns the targets, what was verified and, after a delta, the
    targets' digest (checked equal to the version's unless ``verify="none"``). A device passes ``xor_fn`` to apply
    a delta's changes inside its tensors (``kernels.xor_at_``) and ``digest_fn`` to check the result there
    (``infer.digest.matching_sum64``)."""
    targets, verified, touched = None, "", []
    for src in plan:
        if not src.is_delta:
            try:
                targets, verified = apply_source(src, into if targets is None else targets, verify=verify, cast=cast,
                                                 copy_fn=copy_fn, prefetch=prefetch, progress=progress, label=label)
            except PartialApplyError as exc:
                raise PartialApplyError(str(exc.__cause__ or exc), touched + exc.applied) from exc
            touched += list(targets)
            continue
        targets = target_table(into) if targets is None else targets
        check_source(src, targets, verify=verify, cast=cast, prefetch=prefetch)
        apply_delta(src, targets, verify=verify, copy_fn=copy_fn, xor_fn=xor_fn, touched=touched)
        verified = "sizes and headers only" if verify == "none" else "xxh3_128 and the version's digest"
    if not plan[-1].is_delta or verify == "none":
        return targets, verified, None
    return targets, verified, check_result(plan[-1], targets, touched, digest_fn)
