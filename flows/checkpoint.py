"""Trainer checkpoints as the flows find them: anything ``storage.checkpoint_tensors`` reads (a state dict file, the
per-rank and per-stage files a Paddle trainer saves, a unified checkpoint, a Hugging Face directory) on any fsspec
URL, tensor by tensor; and the ``step_{N}/`` directories a training run leaves behind, each complete only once the
trainer has written its marker file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from storage import checkpoint_tensors, join, listing, open_fs

STEP_DIR = re.compile(r"step_(\d+)")
DONE_MARKER = "COMPLETE"


def serving_shard(source: str, rank: int, tp_size: int, storage_options: dict | None = None) -> dict[str, Any]:
    """Serving rank ``rank``'s state dict out of the checkpoint at ``source``, as lazy tensors each read (and
    merged, unfused and sliced for the rank) only when its part is written (``storage.checkpoint_tensors``)."""
    return checkpoint_tensors(source, rank=rank, tp_size=tp_size, storage_options=storage_options)


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
