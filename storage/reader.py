"""``load_snapshot``: find the best complete source (``resolve``), then check and apply it (``apply``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .apply import CopyFn, Target, apply_source
from .resolve import resolve


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
    """
    if verify is True or verify is False:
        verify = "stream" if verify else "none"
    if verify not in ("full", "stream", "none"):
        raise ValueError(f"verify must be 'full', 'stream' or 'none', not {verify!r}")
    start = time.perf_counter()
    src = resolve(snapshot_root, version, rank, fallback_dir=fallback_dir, strict=strict, storage_options=storage_options)
    targets, verified = apply_source(src, into, verify=verify, cast=cast, copy_fn=copy_fn, prefetch=prefetch,
                                     progress=progress, label=f"load {version} tp{rank}")
    return LoadReport(
        version, rank, int(src.level), src.level.label, src.urls(), src.bytes, time.perf_counter() - start,
        len(targets), verified, targets if into is None else None)
