"""``load_snapshot``: find the best complete source (``resolve``), then check and apply it (``apply``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .apply import CopyFn, Target, target_table
from .chain import apply_plan, describe, load_plan


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
    ``"delta"``); the target's digest proves it holds the base (``base_digest``: the caller's record of it, which
    saves a hashing pass). Anything else (a fresh target too) is loaded through the chain from the nearest full
    version. After a delta the target's digest must equal the version's: a mismatch is a ``PartialApplyError``.
    """
    if verify is True or verify is False:
        verify = "stream" if verify else "none"
    if verify not in ("full", "stream", "none"):
        raise ValueError(f"verify must be 'full', 'stream' or 'none', not {verify!r}")
    start = time.perf_counter()
    plan = load_plan(snapshot_root, version, rank, None if into is None else target_table(into),
                     base_digest=base_digest, fallback_dir=fallback_dir, strict=strict, storage_options=storage_options)
    targets, verified, _ = apply_plan(plan, into, verify=verify, cast=cast, copy_fn=copy_fn, prefetch=prefetch,
                                      progress=progress, label=f"load {version} tp{rank}")
    src = plan[-1]
    return LoadReport(
        version, rank, int(src.level), src.level.label, [u for s in plan for u in s.urls()],
        sum(s.bytes for s in plan), time.perf_counter() - start, len(targets), verified, describe(plan),
        targets if into is None else None)
