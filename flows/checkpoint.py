"""Trainer checkpoints as the flows find them: one full state dict file, the per-rank files a Paddle trainer
saves (``model_state.tp{r}.pdparams``), or a Hugging Face directory (``model.safetensors`` or shards, read tensor by
tensor), on any fsspec URL; and the ``step_{N}/`` directories a
training run leaves behind, each complete only once the trainer has written its marker file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from storage import checkpoint_files as storage_checkpoint_files
from storage import hf_tensors, is_hf_checkpoint, join, listing, open_fs, read_state_file, reshard

STEP_DIR = re.compile(r"step_(\d+)")
DONE_MARKER = "COMPLETE"


def checkpoint_files(source: str, storage_options: dict | None = None) -> list[str]:
    """The URLs a checkpoint consists of, in rank order; per-rank files must be ranks 0..N-1 exactly."""
    files = storage_checkpoint_files(source, storage_options=storage_options)
    ranks = [r for r, _ in files if r is not None]
    if ranks and ranks != list(range(len(ranks))):
        raise ValueError(f"{source}: per-rank files for ranks {ranks} are not ranks 0..{len(ranks) - 1}")
    return [url for _, url in files]


def serving_shard(source: str, rank: int, serving_tp: int, storage_options: dict | None = None) -> dict[str, Any]:
    """Serving rank ``rank``'s state dict out of the trainer checkpoint at ``source``. When the trainer saved at
    the serving degree this reads one file; otherwise it reads them all, merges and splits. A Hugging Face
    directory gives lazy tensors, each read (and sliced for the rank) only when its part is written."""
    if is_hf_checkpoint(source, storage_options):
        return hf_tensors(source, rank=rank, tp_size=serving_tp, storage_options=storage_options)
    files = checkpoint_files(source, storage_options)
    if len(files) == serving_tp:
        return read_state_file(files[rank], storage_options=storage_options)
    shards = [read_state_file(f, storage_options=storage_options) for f in files]
    return reshard(shards, serving_tp)[rank]


@dataclass(frozen=True)
class Step:
    step: int
    url: str

    @property
    def version(self) -> str:
        return f"step_{self.step}"


def completed_steps(trainer_dir: str, marker: str = DONE_MARKER, storage_options: dict | None = None) -> list[Step]:
    """``step_{N}`` directories holding ``marker``, oldest first; one still being written has no marker yet."""
    fs, path = open_fs(trainer_dir, storage_options)
    try:
        entries = fs.ls(path, detail=True)  # open_fs turns S3's listing cache off: a new step shows at once
    except FileNotFoundError:
        return []
    steps = []
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        m = STEP_DIR.fullmatch(name)
        if m and e.get("type") == "directory" and marker in listing(fs, join(path, name)):
            steps.append(Step(int(m.group(1)), fs.unstrip_protocol(join(path, name))))
    return sorted(steps, key=lambda s: s.step)
