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
    snapshot_root: str, version: str, rank: int = 0, *, fallback_dir: str | None = None, strict: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[LevelState]:
    """Every level's state, in priority order; the first ``complete`` one is what ``load_snapshot`` takes."""
    out = []
    for level, where, found in probe_levels(snapshot_root, version, rank, fallback_dir=fallback_dir, strict=strict,
                                            storage_options=storage_options):
        if isinstance(found, Source):
            detail = "manifest + checksums" if found.manifest else "no manifest (sizes and headers checked)"
            if found.is_delta:
                m = found.manifest
                changed = sum(t.part is not None for t in m.tensors.values())
                where = found.urls()[0].rsplit(".delta", 1)[0] + ".delta*.safetensors"
                detail = (f"a delta on {m.base.version} ({m.depth} from a full version), {changed} tensors changed; "
                          f"loads onto a holder of {m.base.version}, else through the chain")
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


def _file_digests(fs, path: str, sha256: bool) -> tuple[str | None, str]:
    with fs.open(path, "rb") as f:
        return digests(iter(lambda: f.read(_CHUNK), b""), sha256)


def verify_snapshot(
    snapshot_root: str, version: str, rank: int = 0, *, fallback_dir: str | None = None, strict: bool = False,
    sha256: bool = False, storage_options: dict[str, Any] | None = None,
) -> tuple[Level, list[FileCheck]]:
    """Re-hash every file of the source ``load_snapshot`` would take against the manifest: xxh3_128, and with
    ``sha256`` also the SHA-256 recorded at publish (a part published without one fails that audit, saying so).

    Sources without a manifest have no recorded checksums: their sizes and headers were checked by resolving,
    and the report says so rather than pretending more.
    """
    src = resolve(snapshot_root, version, rank, fallback_dir=fallback_dir, strict=strict, storage_options=storage_options)
    if src.manifest is None:
        return src.level, [FileCheck(u, True, "structure valid; no manifest, so no checksums to compare") for u in src.urls()]
    checks = []
    for part, url in zip(src.manifest.parts, src.urls()):
        path = src.files[part.index]
        if sha256 and part.sha256 is None:
            checks.append(FileCheck(url, False, "no sha256 recorded (published without --sha256): publish with "
                                    "--sha256 to audit with it, or verify without --sha256 (xxh3_128)"))
            continue
        sha, xx = _file_digests(src.fs, path, sha256)
        pairs = [("xxh3_128", xx, part.xxh3_128)] + ([("sha256", sha, part.sha256)] if sha256 else [])
        bad = [n for n, got, want in pairs if got != want]
        ok = f"sha256 {sha[:16]}… ok" if sha256 else f"xxh3_128 {xx[:16]}… ok"
        checks.append(FileCheck(url, not bad, f"{', '.join(bad)} mismatch: corrupt or replaced" if bad else ok))
    return src.level, checks
