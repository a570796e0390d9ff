"""The versions under a snapshot root: which are committed (``list_versions``), removing old ones (``prune``), and
what each level holds and whether its files still match their manifest (``inspect_snapshot``, ``verify_snapshot``,
behind ``baton inspect`` and ``baton verify``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import layout
from .errors import TornSnapshotError
from .fs import file_checksums, join, listing, open_fs, storage_calls
from .layout import Level
from .manifest import Manifest
from .resolve import Source, probe_levels, resolve


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
            out.append(LevelState(level, where, "complete", len(found.files), found.bytes,
                                  f"{len(found.index())} tensors, {detail}"))
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


def verify_snapshot(
    snapshot_root: str, version: str, rank: int = 0, *, fallback_dir: str | None = None, strict: bool = False,
    sha256: bool = False, storage_options: dict[str, Any] | None = None,
) -> tuple[Level, list[FileCheck]]:
    """Re-hash every file of the source ``load_snapshot`` would take against the manifest: xxh3_128, and with
    ``sha256`` also the SHA-256 recorded at publish (a part published without one fails that audit, saying so).

    Sources without a manifest have no recorded checksums: their sizes and headers were checked by resolving,
    and the report says so rather than pretending more.
    """
    src = resolve(snapshot_root, version, rank, fallback_dir=fallback_dir, strict=strict,
                  storage_options=storage_options)
    if src.manifest is None:
        return src.level, [FileCheck(u, True, "structure valid; no manifest, so no checksums to compare")
                           for u in src.urls()]
    checks = []
    for part, url in zip(src.manifest.parts, src.urls()):
        path = src.files[part.index]
        if sha256 and part.sha256 is None:
            checks.append(FileCheck(url, False, "no sha256 recorded (published without --sha256): publish with "
                                    "--sha256 to audit with it, or verify without --sha256 (xxh3_128)"))
            continue
        sha, xx = file_checksums(src.fs, path, sha256)
        pairs = [("xxh3_128", xx, part.xxh3_128)] + ([("sha256", sha, part.sha256)] if sha256 else [])
        bad = [n for n, got, want in pairs if got != want]
        ok = f"sha256 {sha[:16]}… ok" if sha256 else f"xxh3_128 {xx[:16]}… ok"
        checks.append(FileCheck(url, not bad, f"{', '.join(bad)} mismatch: corrupt or replaced" if bad else ok))
    return src.level, checks


def remove_version(fs, root: str, names: Mapping[str, int], rank: int, version: str) -> None:
    """Manifest first: from that instant the version no longer exists for any reader."""
    manifest = layout.manifest_name(rank, version)
    if manifest in names:
        fs.rm_file(join(root, manifest))
    parts, deltas = layout.part_regex(rank, version), layout.delta_regex(rank, version)
    for name in names:
        if parts.fullmatch(name) or deltas.fullmatch(name) or name == layout.pending_name(rank, version):
            fs.rm_file(join(root, name))


@dataclass(frozen=True)
class VersionInfo:
    version: str
    ranks: tuple[int, ...]
    published_at: float
    bytes: int
    base: str | None = None  # a delta's base version: it must stay while this one is kept


@storage_calls
def list_versions(snapshot_root: str, *, storage_options: dict[str, Any] | None = None) -> list[VersionInfo]:
    """Committed versions (those with a manifest), oldest first."""
    fs, root = open_fs(snapshot_root, storage_options)
    found: dict[str, list[Manifest]] = {}
    for name in listing(fs, root):
        parsed = layout.parse_manifest_name(name)
        if parsed:
            try:
                raw = fs.cat_file(join(root, name))
            except FileNotFoundError:  # pruned since it was listed
                continue
            found.setdefault(parsed[1], []).append(Manifest.from_json(raw, join(root, name)))
    infos = [
        VersionInfo(vid, tuple(sorted(m.rank for m in ms)), max(m.published_at for m in ms),
                    sum(m.total_bytes for m in ms),
                    next((m.base.version for m in ms if m.is_delta), None))
        for vid, ms in found.items()
    ]
    return sorted(infos, key=lambda v: (v.published_at, v.version))


@storage_calls
def prune(
    snapshot_root: str,
    keep_last: int,
    *,
    keep: tuple[str, ...] | list[str] = (),
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Delete all but the newest ``keep_last`` versions (and any id in ``keep``); returns the ids removed.

    A version a kept delta is built on (its base, the base's base, down to a full version) is kept too. Each
    version's manifests go first, so a reader either sees the whole version or none of it.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (got {keep_last}): pruning never deletes every version")
    versions = list_versions(snapshot_root, storage_options=storage_options)
    bases = {v.version: v.base for v in versions}
    kept = {v.version for v in versions[max(0, len(versions) - keep_last):]} | set(keep)
    for version in list(kept):
        while bases.get(version) and bases[version] not in kept:
            version = bases[version]
            kept.add(version)
    doomed = [v for v in versions if v.version not in kept]
    fs, root = open_fs(snapshot_root, storage_options)
    names = listing(fs, root)
    for v in doomed:
        for rank in v.ranks:
            remove_version(fs, root, names, rank, v.version)
    return [v.version for v in doomed]
