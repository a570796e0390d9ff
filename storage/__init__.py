"""Baton's snapshot format on any fsspec URL: publish a state dict as parts, load it back memory-bounded.

See ``storage/FORMAT.md`` for the layout on one page.
"""

from .errors import (
    IncompatibleTargetError,
    PartialApplyError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    TornSnapshotError,
    UnsafeCheckpointError,
)
from .layout import Level
from .reader import LoadReport, load_snapshot, probe_levels, resolve
from .tp import LLAMA_TP_RULES, merge_state_dicts, reshard, split_state_dict
from .writer import PublishReport, VersionInfo, list_versions, prune, publish

__all__ = [
    "IncompatibleTargetError", "PartialApplyError", "SnapshotError", "SnapshotExistsError", "SnapshotNotFoundError",
    "TornSnapshotError", "UnsafeCheckpointError", "Level", "LoadReport", "load_snapshot", "probe_levels", "resolve",
    "PublishReport", "VersionInfo", "list_versions", "prune", "publish",
    "LLAMA_TP_RULES", "merge_state_dicts", "reshard", "split_state_dict",
]
