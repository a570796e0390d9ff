"""What a user asks before trusting a snapshot: what exists at each level, and do the bytes match."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import TornSnapshotError
from .layout import Level
from .resolve import Source, probe_levels, resolve
from .writer import digests

_CHUNK = 8 << 20


@dataclass(frozen=True)
class LevelState:
    level: Level
    where: str
    state: str  # "complete", "torn" or "absent"
    files: int
    bytes: int
    detail: str


def inspect_snapshot(
    root_url: str, version_id: str, rank: int = 0, *, fallback_dir: str | None = None, strict: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[LevelState]:
    """Every level's state, in priority order; the first ``complete`` one is what ``load_snapshot`` takes."""
    out = []
    for level, where, found in probe_levels(root_url, version_id, rank, fallback_dir=fallback_dir, strict=strict,
                                            storage_options=storage_options):
        if isinstance(found, Source):
            detail = "manifest + checksums" if found.manifest else "no manifest (sizes and headers checked)"
            out.append(LevelState(level, where, "complete", len(found.files), found.bytes, f"{len(found.index())} tensors, {detail}"))
        elif isinstance(found, TornSnapshotError):
            out.append(LevelState(level, where, "torn", 0, 0, str(found)))
        else:
            out.append(LevelState(level, where, "absent", 0, 0, ""))
    return out


@dataclass(frozen=True)
class FileCheck:
    url: str
    ok: bool
    detail: str


def _file_digests(fs, path: str) -> tuple[str, str]:
    with fs.open(path, "rb") as f:
        return digests(iter(lambda: f.read(_CHUNK), b""))


def verify_snapshot(
    root_url: str, version_id: str, rank: int = 0, *, fallback_dir: str | None = None, strict: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> tuple[Level, list[FileCheck]]:
    """Re-hash every file of the source ``load_snapshot`` would take (sha256 and xxh3_128 against the manifest).

    Sources without a manifest have no recorded checksums: their sizes and headers were checked by resolving,
    and the report says so rather than pretending more.
    """
    src = resolve(root_url, version_id, rank, fallback_dir=fallback_dir, strict=strict, storage_options=storage_options)
    if src.manifest is None:
        return src.level, [FileCheck(u, True, "structure valid; no manifest, so no checksums to compare") for u in src.urls()]
    checks = []
    for part, url in zip(src.manifest.parts, src.urls()):
        path = src.files[part.index]
        sha, xx = _file_digests(src.fs, path)
        bad = [n for n, got, want in (("sha256", sha, part.sha256), ("xxh3_128", xx, part.xxh3_128)) if got != want]
        checks.append(FileCheck(url, not bad, f"{', '.join(bad)} mismatch: corrupt or replaced" if bad else f"sha256 {sha[:16]}… ok"))
    return src.level, checks
