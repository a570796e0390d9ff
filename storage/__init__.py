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
from .apply import apply_source, check_source
from .checkpoint import read_state_file
from .chain import load_plan, resolve_chain
from .delta import LastPublished
from .fs import join, listing, open_fs
from .hfdir import hf_tensors, is_hf_checkpoint
from .layout import Level, check_id, manifest_name
from .reader import LoadReport, load_snapshot
from .resolve import Source, probe_levels, resolve
from .tensorfile import code_of_numpy, code_of_paddle
from .trainer import checkpoint_tensors, trainer_tensors
from .tp import LLAMA_TP_RULES, merge_state_dicts, reshard, shard_views, split_state_dict
from .writer import PublishReport, TensorRef, VersionInfo, list_versions, prune, publish

__all__ = [
    "IncompatibleTargetError", "PartialApplyError", "SnapshotError", "SnapshotExistsError", "SnapshotNotFoundError",
    "TornSnapshotError", "UnsafeCheckpointError", "Level", "LoadReport", "load_snapshot", "probe_levels", "resolve",
    "Source", "apply_source", "check_source", "checkpoint_tensors", "trainer_tensors", "read_state_file",
    "LastPublished", "load_plan", "resolve_chain", "PublishReport", "TensorRef", "VersionInfo", "hf_tensors", "is_hf_checkpoint", "list_versions", "prune", "publish",
    "LLAMA_TP_RULES", "merge_state_dicts", "reshard", "shard_views", "split_state_dict",
    "open_fs", "join", "listing", "check_id", "manifest_name", "code_of_numpy", "code_of_paddle",
]
