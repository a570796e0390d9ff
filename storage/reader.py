"""Loading a version: ``load_plan`` picks the sources that take a target there (the version's own, full or a delta
onto the base the target holds, else the chain from the nearest full version), ``apply_plan`` checks and applies
them in order (``storage.apply`` for full versions, ``storage.deltaload`` for deltas), and ``load_snapshot`` does
both for one rank and reports what it did.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .apply import CopyFn, Target, apply_source, check_source, target_table
from .deltaload import DigestFn, RankReader, XorFn, apply_delta, check_result, holds_base, resolve_chain
from .digest import combine, sums_digest, tensor_digest, tensor_sums
from .errors import PartialApplyError
from .resolve import Source, resolve
from .tensorfile import code_of, copy_converted


class LoadPlan(tuple):
    """The sources that take a target to a version, in the order they are applied: a full version, then deltas."""

    __slots__ = ()

    def __getitem__(self, i):
        got = super().__getitem__(i)
        return LoadPlan(got) if isinstance(i, slice) else got

    @property
    def path(self) -> str:
        """How the plan loads: what ``LoadReport.path``, the server's reply and its metrics say."""
        if not self[-1].is_delta:
            return "full"
        return "delta" if len(self) == 1 else f"chain of {len(self) - 1} deltas from {self[0].manifest.version}"


def load_plan(snapshot_root: str, version: str, rank: int, targets: Mapping[str, Any] | None, *,
              base_digest: str | None = None, fallback_dir: str | None = None, strict: bool = False,
              storage_options: dict[str, Any] | None = None, held_sums: Mapping[str, int] | None = None,
              found_sums: dict[str, int] | None = None) -> LoadPlan:
    """The sources that take ``targets`` to ``version``, in order: the version's own (a full version, or a delta
    when the targets hold its base: ``base_digest`` when the caller knows their digest, else their ``held_sums``
    against the base manifest's ``sum64``, else computed over them: their ``sum64`` into ``found_sums`` when given,
    else their digest), or the chain from the nearest full version."""
    src = resolve(snapshot_root, version, rank, fallback_dir=fallback_dir, strict=strict,
                  storage_options=storage_options)
    if not src.is_delta:
        return LoadPlan([src])
    if targets is not None and holds_base(src, targets, base_digest, held_sums, snapshot_root=snapshot_root,
                                          storage_options=storage_options, found_sums=found_sums):
        return LoadPlan([src])
    return LoadPlan(resolve_chain(snapshot_root, version, rank, storage_options=storage_options, first=src))


class Applied(NamedTuple):
    """What ``apply_plan`` did: the targets, what was verified, their digest when a delta's check proved it (the
    version's), and each target's ``sum64`` when tracked (``held_sums``) and proven by the version's."""

    targets: dict[str, Any]
    verified: str
    digest: str | None
    sums: dict[str, int] | None


def apply_plan(plan: list[Source], into: Any, *, verify: str = "stream", cast: bool = False, copy_fn=None,
               xor_fn: XorFn | None = None, digest_fn: DigestFn | None = None, prefetch: int = 8,
               progress: bool = False, label: str = "load", held_sums: Mapping[str, int] | None = None) -> Applied:
    """Applies each source of ``plan`` in order; returns the targets, what was verified, after a delta the
    targets' digest (checked equal to the version's unless ``verify="none"``) and the targets' sums. A device passes
    ``xor_fn`` to apply a delta's changes inside its tensors (``kernels.xor_at_``) and ``digest_fn`` to check the
    result there (``infer.digest.matching_sum64``).

    ``held_sums``: each target's ``sum64`` (``storage.digest``, read as the snapshot's dtypes) as the caller knows
    it, which tracks them. A plan of one delta onto the base the targets hold then advances them from the changed
    elements alone and proves the result by the manifest's ``sum64``: O(changed), even with ``verify="none"``.
    Any other plan, and ``verify="full"`` (whose proof stays xxh3 over every tensor), computes them over the targets
    afterwards (on the host), checked against the manifest's ``sum64`` (for a delta, as its proof instead of a
    second hash). They come back in ``Applied.sums`` when proven (None without ``held_sums``, where the manifest
    records no ``sum64``, or where a cast target lost bits)."""
    last = plan[-1]
    index = last.index()
    if len(plan) > 1 and cast:
        targets = target_table(into)
        if any(code_of(targets[n]) != code for n, (code, _) in index.items() if n in targets):
            return _cast_chain(plan, targets, verify, copy_fn)
    short = held_sums is not None and len(plan) == 1 and last.is_delta and last.manifest.sum64 is not None and \
        verify != "full"
    sums = None
    if short:
        missing = sorted(set(index) - set(held_sums))
        if missing:
            raise ValueError(f"held_sums has no sum for {missing[:5]}: pass every tensor's, or none")
        sums = {n: int(held_sums[n]) % 2**64 for n in index}
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
        apply_delta(src, targets, verify=verify, copy_fn=copy_fn, xor_fn=xor_fn, touched=touched, sums=sums)
        verified = "sizes and headers only" if verify == "none" else "xxh3_128 and the version's digest"
    if short:
        verified = ("sizes and headers" if verify == "none" else "xxh3_128") + \
            ", and the version's sum64 over the changed elements"
        return Applied(targets, verified, check_result(last, targets, touched, sums=sums), sums)
    if held_sums is not None and last.manifest is not None and last.manifest.sum64 is not None:
        sums = tensor_sums(targets, index)
    if not last.is_delta or verify == "none":
        proven = sums is not None and sums_digest(index, sums) == last.manifest.sum64
        return Applied(targets, verified, None, sums if proven else None)
    if sums is not None and verify != "full":  # the sums just computed prove the result: no second pass
        return Applied(targets, verified, check_result(last, targets, touched, sums=sums), sums)
    return Applied(targets, verified, check_result(last, targets, touched, digest_fn), sums)


def _cast_chain(plan: list[Source], targets: dict[str, Any], verify: str, copy_fn: CopyFn | None) -> Applied:
    """A chain into targets of another dtype (a cast): a delta changes the snapshot's bits, which a target cast from
    them does not hold, so each tensor is read whole at the version through the chain on the host (the full
    version's part, then each delta's change, every file checked against its manifest) and only then cast into its
    target. The tensors' digest must be the version's; about one file of each link is held at a time."""
    last = plan[-1]
    check_source(last, targets, verify=verify, cast=True)
    reader, index, digests, touched = RankReader(list(plan)), last.index(), {}, []
    try:
        for name in [e.name for header in plan[0].headers for e in header.entries]:  # file by file
            code, shape = index[name]
            raw = reader.raw(name)
            digests[name] = tensor_digest(name, code, shape, raw)
            touched.append(name)
            copy_converted(targets[name], raw, code, shape, copy_fn)
    except Exception as exc:
        if not touched:
            raise
        raise PartialApplyError(str(exc), touched) from exc
    if combine(digests) != last.manifest.digest:
        raise PartialApplyError(f"{last.urls()[0]}: the chain's tensors digest to {combine(digests)}, the version's "
                                f"manifest says {last.manifest.digest}: publish it again", touched)
    return Applied(targets, "xxh3_128 and the version's digest, before the cast", None, None)


@dataclass
class LoadReport:
    version: str
    rank: int
    level: int
    source: str  # the level's label, e.g. "chunked parts"
    files: list[str]
    bytes: int
    seconds: float
    tensors: int
    verified: str  # "xxh3_128 before apply", "xxh3_128 while applying" or what could not be checked
    path: str = "full"  # "full", "delta" (into its base) or "chain of N deltas from V"
    state_dict: dict[str, Any] | None = field(default=None, repr=False)  # filled when into=None
    sums: dict[str, int] | None = field(default=None, repr=False)  # each tensor's sum64, where proven

    @property
    def gbps(self) -> float:
        return self.bytes / 1e9 / self.seconds if self.seconds else 0.0


def load_snapshot(
    snapshot_root: str,
    version: str,
    rank: int = 0,
    *,
    fallback_dir: str | None = None,
    into: Target | None = None,
    verify: str | bool = "stream",
    strict: bool = False,
    cast: bool = False,
    copy_fn: CopyFn | None = None,
    prefetch: int = 8,
    progress: bool = False,
    storage_options: dict[str, Any] | None = None,
    base_digest: str | None = None,
    held_sums: Mapping[str, int] | None = None,
) -> LoadReport:
    """Load version ``version`` of ``rank`` into ``into`` in place, trying levels 1-4 in order.

    ``verify``: ``"stream"`` (default) reads every byte once and checks each part's xxh3_128 as it is applied;
    a corrupt or torn part found after the first write raises ``PartialApplyError`` naming every tensor
    touched, and the caller restores (the server does). ``"full"`` hashes every part before the first write,
    so corruption leaves the target untouched, at the price of a second read of the local files. ``"none"``
    checks sizes and headers only. Remote parts are downloaded once, ``prefetch`` at a time, into a local
    temporary directory (``TMPDIR``) and applied as they arrive, in every mode. ``strict`` refuses
    parts without a manifest. ``cast`` lets float snapshots load into float targets of another dtype.
    ``copy_fn(live, loaded)`` replaces the in-place copy (e.g. a GPU cast kernel). With ``into=None`` fresh
    Paddle tensors are allocated and returned in ``report.state_dict``. Storage trouble before the first write
    raises ``OSError``; anything wrong with the snapshot a ``SnapshotError`` naming the file.

    A delta version loads into a target that holds its base by reading only the delta's files (``report.path``
    ``"delta"``). The base is proven by ``base_digest`` (the caller's record of the target's digest), else
    ``held_sums``, else the target's ``sum64`` computed in one pass and compared with the base manifest's, which the
    apply then advances (``report.sums``; the xxh3 digest over the target where the manifest has no ``sum64``).
    Anything else (a fresh target too) is loaded through the chain from the nearest full version. After a delta the
    target's digest must equal the version's: a mismatch is a ``PartialApplyError``.

    ``held_sums``: each target tensor's ``sum64`` as the caller knows them (``report.sums`` of the load that filled
    it; ``{}`` to start tracking them at a full load). A delta onto its base then proves the base and its result
    from the changed elements alone (``apply_plan``), and ``report.sums`` holds the new sums for the next load. A
    target changed outside Baton since its sums were taken is not detected that way: ``verify="full"`` proves the
    whole model (xxh3 over every tensor) and still returns the sums.
    """
    if verify is True or verify is False:
        verify = "stream" if verify else "none"
    if verify not in ("full", "stream", "none"):
        raise ValueError(f"verify must be 'full', 'stream' or 'none', not {verify!r}")
    start = time.perf_counter()
    # with nothing known of the target, a delta's base is proven by its sums, which the apply then advances
    found: dict[str, int] | None = {} if held_sums is None and base_digest is None and verify != "full" else None
    plan = load_plan(snapshot_root, version, rank, None if into is None else target_table(into),
                     base_digest=base_digest, fallback_dir=fallback_dir, strict=strict, storage_options=storage_options,
                     held_sums=held_sums, found_sums=found)
    targets, verified, _, sums = apply_plan(plan, into, verify=verify, cast=cast, copy_fn=copy_fn, prefetch=prefetch,
                                            progress=progress, label=f"load {version} tp{rank}",
                                            held_sums=held_sums if held_sums is not None else found or None)
    src = plan[-1]
    return LoadReport(
        version, rank, int(src.level), src.level.label, [u for s in plan for u in s.urls()],
        sum(s.bytes for s in plan), time.perf_counter() - start, len(targets), verified, plan.path,
        targets if into is None else None, sums)
