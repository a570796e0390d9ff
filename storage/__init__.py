"""Baton's snapshot format on any fsspec URL: publish a state dict as parts, load it back memory-bounded.

See ``storage/FORMAT.md`` for the layout on one page.
"""

from .apply import apply_source, check_source
from .catalog import VersionInfo, list_versions, prune
from .delta import LastPublished
from .deltaload import resolve_chain
from .errors import (
    IncompatibleTargetError,
    PartialApplyError,
    SnapshotError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    TornSnapshotError,
    UnsafeCheckpointError,
)
from .fs import join, listing, open_fs, read_record, write_json
from .hfdir import hf_tensors, is_hf_checkpoint
from .layout import Level, check_id, manifest_name
from .reader import LoadPlan, LoadReport, apply_plan, load_plan, load_snapshot
from .resolve import Source, probe_levels, resolve
from .tensorfile import TensorRef, code_of, code_of_numpy, code_of_paddle, host_array
from .tp import LLAMA_TP_RULES, merge_state_dicts, reshard, shard_views, split_state_dict
from .trainer import checkpoint_tensors, read_state_file, trainer_tensors
from .writer import DEFAULT_PART_BYTES, PublishOptions, PublishReport, publish

__all__ = [
    "IncompatibleTargetError", "PartialApplyError", "SnapshotError", "SnapshotExistsError", "SnapshotNotFoundError",
    "TornSnapshotError", "UnsafeCheckpointError", "Level", "LoadPlan", "LoadReport", "load_plan", "apply_plan",
    "load_snapshot", "probe_levels", "resolve", "resolve_chain", "Source", "apply_source", "check_source",
    "checkpoint_tensors", "trainer_tensors", "read_state_file", "hf_tensors", "is_hf_checkpoint", "TensorRef",
    "LastPublished", "PublishOptions", "PublishReport", "DEFAULT_PART_BYTES", "publish", "VersionInfo",
    "list_versions", "prune", "LLAMA_TP_RULES", "merge_state_dicts", "reshard", "shard_views", "split_state_dict",
    "open_fs", "join", "listing", "read_record", "write_json", "check_id", "manifest_name", "code_of",
    "code_of_numpy", "code_of_paddle", "host_array",
]
