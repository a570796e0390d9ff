"""What an update reports and how it fails: ``WeightInfo`` (what a model copy holds), ``Prepared`` (a version made
ready by phase one of a fleet's flip), ``Undo`` (how an ``in_place`` copy goes back from a delta) and the
``UpdateError`` family, whose ``outcome`` labels the update metric and whose type picks the HTTP status
(``infer.routes.weights``). ``infer.weights`` re-exports the public names."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import storage

if TYPE_CHECKING:
    from infer.weights import Slot


@dataclass(frozen=True)
class WeightInfo:
    """What a model copy holds: which version, from where, and a digest of its live bytes."""

    version: str
    snapshot_root: str
    rank: int
    level: int
    source: str
    loaded_at: float
    bytes: int
    seconds: float
    digest: str
    path: str = "full"  # how it was loaded: "full", "delta" (onto the base it held) or "chain of N deltas from V"

    def to_json(self) -> dict[str, Any]:
        """The public names ``GET /v1/weights`` uses."""
        return {"version": self.version, "snapshot_root": self.snapshot_root, "rank": self.rank,
                "source_level": self.level,
                "source": self.source, "loaded_at": datetime.fromtimestamp(self.loaded_at, timezone.utc).isoformat(),
                "bytes": self.bytes, "seconds": self.seconds, "digest": self.digest, "load_path": self.path}


class UpdateError(Exception):
    """An update that did not happen (or was undone). Subclasses say why; ``outcome`` labels the metric."""

    outcome = "error"


class UpdateBusy(UpdateError):
    """Another update is in progress."""

    outcome = "busy"


class SnapshotRejected(UpdateError):
    """The snapshot is missing, torn, corrupt or does not fit (or the request names it wrongly); the previous
    version is serving (restored, when the failure came midway)."""

    def __init__(self, message: str, outcome: str = "bad_snapshot"):
        super().__init__(message)
        self.outcome = outcome


class StorageUnavailable(UpdateError):
    """Storage could not be reached; nothing was written."""

    outcome = "storage_error"


class RestoreFailed(UpdateError):
    """A failed update could not be undone: the server serves nothing rather than a torn model."""

    outcome = "broken"


class NotPrepared(UpdateError):
    """A commit with no prepared version to serve (never prepared, replaced by another prepare, aborted, expired)."""

    outcome = "not_prepared"


class NotReady(Exception):
    """No weights to serve: none loaded yet, or a failed update could not be undone."""


@dataclass(frozen=True)
class Prepared:
    """A version ``prepare`` made ready and ``commit`` has not served yet."""

    info: WeightInfo  # double_buffer: what the spare holds; in_place: what was checked (no bytes written)
    verify: str
    expires: float  # time.monotonic() after which it is dropped
    slot: Slot | None  # the spare holding it; None for in_place, whose commit loads it

    def to_json(self) -> dict[str, Any]:
        return {"version": self.info.version, "snapshot_root": self.info.snapshot_root,
                "held": "spare" if self.slot else "checked", "expires_in_s": round(self.expires - time.monotonic(), 1)}


@dataclass(frozen=True)
class Undo:
    """How to take an ``in_place`` server back from a delta it just applied: the same delta again."""

    version: str  # what the delta made live
    previous: WeightInfo  # the base it was applied onto
    sources: list  # the update's per-rank plans (one delta each)
    held: dict | None  # the base's record (``Slot.held``): reversing must give back these very sums


def cause(exc: Exception) -> str:
    """What went wrong, without a partial apply's advice to restore (the manager does that itself)."""
    if isinstance(exc, storage.PartialApplyError) and exc.__cause__ is not None:
        return f"{exc.__cause__}, after {len(exc.applied)} tensors were written"
    return str(exc)
