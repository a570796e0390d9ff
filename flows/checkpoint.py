"""Trainer checkpoints as the flows find them: one full state dict file, or the per-rank files a Paddle trainer
saves (``model_state.tp{r}.pdparams``), in a directory on any fsspec URL; and the ``step_{N}/`` directories a
training run leaves behind, each complete only once the trainer has written its marker file."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from storage.fs import join, listing, open_fs
from storage.reader import read_state_file
from storage.tp import reshard

RANK_FILE = re.compile(r"model_state\.tp(\d+)\.pdparams")
STATE_SUFFIXES = (".pdparams", ".safetensors")
STEP_DIR = re.compile(r"step_(\d+)")
DONE_MARKER = "COMPLETE"


def checkpoint_files(source: str, storage_options: dict | None = None) -> list[str]:
    """The URLs a checkpoint consists of, in rank order: the file itself, a directory's per-rank files, or a
    directory's single state file."""
    fs, path = open_fs(source, storage_options)
    if fs.isfile(path):
        return [source]
    names = listing(fs, path)
    ranks = sorted((int(m.group(1)), n) for n in names if (m := RANK_FILE.fullmatch(n)))
    if ranks:
        if [r for r, _ in ranks] != list(range(len(ranks))):
            raise ValueError(f"{source}: per-rank files {[n for _, n in ranks]} are not ranks 0..{len(ranks) - 1}")
        return [fs.unstrip_protocol(join(path, n)) for _, n in ranks]
    singles = sorted(n for n in names if n.endswith(STATE_SUFFIXES))
    if len(singles) == 1:
        return [fs.unstrip_protocol(join(path, singles[0]))]
    if not names and not fs.exists(path):
        raise FileNotFoundError(f"{source}: no such checkpoint file or directory")
    raise ValueError(f"{source}: expected one state dict file or model_state.tp{{r}}.pdparams files, found "
                     f"{sorted(names)[:10] or 'nothing'}")


def serving_shard(source: str, rank: int, serving_tp: int, storage_options: dict | None = None) -> dict[str, Any]:
    """Serving rank ``rank``'s state dict out of the trainer checkpoint at ``source``. When the trainer saved at
    the serving degree this reads one file; otherwise it reads them all, merges and splits."""
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
