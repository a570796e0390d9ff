"""Finding a snapshot: probe levels 1-4 in order and return the first complete one, fully checked for structure.

Nothing here reads tensor data. A level is complete when every file it needs is there with the size its
manifest (or header) says and every header is valid; anything else is a ``TornSnapshotError`` naming the
file, so the caller can say exactly why a level was passed over.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from . import layout
from .errors import SnapshotNotFoundError, TornSnapshotError
from .fs import file_checksums, is_local, join, listing, open_fs, storage_calls
from .layout import Level
from .manifest import MAX_MANIFEST_BYTES, Manifest
from .pickle_safe import load_state_pickle
from .tensorfile import Header, code_of_saved, parse_header, read_headers, url_of, vanished

log = logging.getLogger("baton.storage")


@dataclass
class Source:
    """One level's files, fully validated for structure (sizes, headers, manifest agreement)."""

    level: Level
    fs: Any
    files: list[str]
    sizes: list[int]
    headers: list[Header | None]
    checksums: list[str | None]  # each file's xxh3_128 from the manifest; None where there is no manifest
    arrays: dict[str, np.ndarray] | None = None  # level 4: the restricted-unpickled state dict
    manifest: Manifest | None = None
    origin: list[str] | None = None  # where the files came from, when ``files`` are local copies of them

    @property
    def bytes(self) -> int:
        return sum(self.sizes)

    @property
    def is_delta(self) -> bool:
        """Files of changed elements against ``manifest.base``, not whole tensors (``storage.delta``)."""
        return self.manifest is not None and self.manifest.is_delta

    def urls(self) -> list[str]:
        return self.origin or [self.fs.unstrip_protocol(f) for f in self.files]

    def index(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype code, shape) of every tensor in the source."""
        if self.arrays is not None:
            return {n: (code_of_saved(a), tuple(a.shape)) for n, a in self.arrays.items()}
        if self.is_delta:  # the files hold encoded changes; the manifest has every tensor's own dtype and shape
            return {n: (t.dtype, t.shape) for n, t in self.manifest.tensors.items()}
        return {e.name: (e.dtype, e.shape) for h in self.headers if h for e in h.entries}


    def check_head(self, i: int, head: bytes | bytearray | memoryview) -> None:
        """File ``i``'s first bytes, as read, against the header its manifest records (what the load took its layout
        from, without probing the file): a file replaced since it was published is refused before its bytes are
        placed by a layout that is not theirs, even under ``verify="none"``."""
        recorded = self.manifest.parts[i].header_bytes() if self.manifest is not None else None
        if recorded is not None and bytes(head[:len(recorded)]) != recorded:
            raise TornSnapshotError(self.urls()[i], "its header differs from the one its manifest records (replaced "
                                    "since it was published?); publish the version again")

    def read(self, i: int, verify: bool = True) -> bytes:
        """File ``i`` whole, its size and (with ``verify``, where the manifest records one) its checksum checked before
        any of it is used. Read into memory, never mapped: a file truncated while mapped would kill the process
        (SIGBUS); one truncated before it is read is a ``TornSnapshotError``."""
        url = self.urls()[i]
        try:
            data = self.fs.cat_file(self.files[i])
        except FileNotFoundError:
            raise disappeared(url) from None
        if len(data) != self.sizes[i]:
            raise TornSnapshotError(url, f"read {len(data)} bytes, expected {self.sizes[i]} (changed while loading?)")
        self.check_head(i, memoryview(data))
        if verify and self.checksums[i]:
            got = xxhash.xxh3_128(data).hexdigest()
            if got != self.checksums[i]:
                raise TornSnapshotError.checksum(url, got, self.checksums[i])
        return data


    def verify(self, prefetch: int = 4) -> None:
        """Hashes every file that has a checksum, ``prefetch`` at a time, against the manifest."""
        todo = [(p, u, c) for p, u, c in zip(self.files, self.urls(), self.checksums) if c]

        def checksum(item: tuple[str, str, str]) -> str:
            try:
                return file_checksums(self.fs, item[0])[1]
            except FileNotFoundError:
                raise disappeared(item[1]) from None

        with ThreadPoolExecutor(max(1, prefetch)) as pool:
            for (_, url, expected), got in zip(todo, pool.map(checksum, todo)):
                if got != expected:
                    raise TornSnapshotError.checksum(url, got, expected)


def disappeared(url: str) -> TornSnapshotError:
    return TornSnapshotError(url, "disappeared while loading (pruned or replaced?); load again, or publish the "
                             "version again if it was pruned")


def _probe_parts(fs, root: str, names: Mapping[str, int], rank: int, version: str, strict: bool) -> Source | None:
    found = {int(m.group(1)): n for n in names if (m := layout.part_regex(rank, version).fullmatch(n))}
    manifest_file = layout.manifest_name(rank, version)
    if manifest_file in names:
        return _parts_with_manifest(fs, root, names, found, manifest_file, rank, version)
    if not found:
        return None
    if layout.pending_name(rank, version) in names:
        raise TornSnapshotError(
            url_of(fs, join(root, layout.pending_name(rank, version))),
            "a Baton publish of this version is in progress or was interrupted (parts present, no manifest yet)")
    if strict:
        raise TornSnapshotError(
            url_of(fs, join(root, manifest_file)),
            f"manifest missing for {len(found)} part file(s) (strict mode); publish with Baton, or pass "
            "strict=False to accept FastDeploy-style parts without a manifest")
    order = sorted(found)  # FastDeploy sorts by the number and its own tests start at 1: any start, no gaps
    if order != list(range(order[0], order[0] + len(order))):
        gap = next(i for i in range(order[0], order[-1]) if i not in found)
        raise TornSnapshotError(
            url_of(fs, join(root, layout.part_name(rank, version, gap))),
            f"part {gap} is missing but parts {order} exist (gap in the numbering)")
    paths = [join(root, found[i]) for i in order]
    headers = read_headers(fs, paths, [names[found[i]] for i in order])
    seen: dict[str, str] = {}
    for path, h in zip(paths, headers):
        for e in h.entries:
            if e.name in seen:
                raise TornSnapshotError(url_of(fs, path), f"tensor {e.name!r} also appears in {seen[e.name]}")
            seen[e.name] = url_of(fs, path)
    return Source(Level.PARTS, fs, paths, [names[found[i]] for i in order], headers, [None] * len(paths))


def _read_manifest(fs, root: str, name: str, size: int) -> Manifest:
    path = join(root, name)
    if size > MAX_MANIFEST_BYTES:
        raise TornSnapshotError(url_of(fs, path), f"manifest is {size} bytes, over the {MAX_MANIFEST_BYTES}-byte "
                                "limit: not written by Baton; remove it and publish again")
    try:
        raw = fs.cat_file(path)
    except OSError as exc:
        raise vanished(fs, path, exc) from None
    return Manifest.from_json(raw, url_of(fs, path))


@storage_calls
def read_manifest(snapshot_root: str, version: str, rank: int = 0, *,
                  storage_options: dict[str, Any] | None = None) -> Manifest | None:
    """``version``'s manifest for ``rank`` alone, or None where it has none: one small read, no listing and no part
    headers, for a caller that needs only a version's digests (a delta's base, proven by its ``sum64``)."""
    layout.check_id(version)
    layout.check_rank(rank)
    fs, root = open_fs(snapshot_root, storage_options)
    path = join(root, layout.manifest_name(rank, version))
    try:
        raw = fs.cat_file(path, start=0, end=MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise TornSnapshotError(url_of(fs, path), f"manifest is over the {MAX_MANIFEST_BYTES}-byte limit: not written "
                                "by Baton; remove it and publish again")
    manifest = Manifest.from_json(raw, url_of(fs, path))
    return manifest if (manifest.version, manifest.rank) == (version, rank) else None


def _parts_with_manifest(fs, root, names, found, manifest_file, rank, version) -> Source:
    m = _read_manifest(fs, root, manifest_file, names[manifest_file])
    where = url_of(fs, join(root, manifest_file))
    if m.version != version or m.rank != rank:
        raise TornSnapshotError(where, f"manifest is for version {m.version!r} rank {m.rank}")
    paths = []
    name_of = layout.delta_name if m.is_delta else layout.part_name
    for p in m.parts:
        expected = name_of(rank, version, p.index)
        path = join(root, expected)
        if p.file != expected:
            raise TornSnapshotError(where, f"manifest names {p.file!r} as part {p.index}; that part must be called "
                                    f"{expected!r} (a hand-edited or foreign manifest: publish the version again)")
        if p.file not in names:
            raise TornSnapshotError(url_of(fs, path), f"part {p.index} listed in the manifest is missing")
        if names[p.file] != p.bytes:
            raise TornSnapshotError(
                url_of(fs, path), f"size {names[p.file]} bytes, manifest says {p.bytes} (truncated or replaced)")
        paths.append(path)
    strays = []
    if m.is_delta:  # its files are delta{N}; whole-tensor parts have no place beside them
        strays = [found[i] for i in sorted(found)]
        found = {int(x.group(1)): n for n in names if (x := layout.delta_regex(rank, version).fullmatch(n))}
    strays += [found[i] for i in sorted(set(found) - {p.index for p in m.parts})]
    if strays:
        raise TornSnapshotError(
            url_of(fs, join(root, strays[0])), "part file not listed in the manifest (left from another publish?)")
    recorded = [p.header_bytes() for p in m.parts]
    if not is_local(fs) and not m.is_delta and all(h is not None for h in recorded):
        # remote parts whose manifest holds every header: no probe before the download (one round trip less); each
        # downloaded file's own header is compared with its record before the first write (``storage.apply``)
        headers = [parse_header(h, f"{where} (parts[{p.index}].header)", p.bytes) for h, p in zip(recorded, m.parts)]
    else:
        headers = read_headers(fs, paths, [p.bytes for p in m.parts])
    count = 0
    for index, (path, h) in enumerate(zip(paths, headers)):
        for e in h.entries:
            rec = m.tensors.get(e.name)
            if m.is_delta:  # a delta file holds each changed tensor's blob as bytes
                ok = rec is not None and rec.part == index and (e.dtype, len(e.shape)) == ("U8", 1)
            else:
                ok = rec is not None and (rec.dtype, rec.shape, rec.part) == (e.dtype, e.shape, index)
            if not ok:
                raise TornSnapshotError(url_of(fs, path), f"tensor {e.name!r} disagrees with the manifest")
            count += 1
    stored = sum(t.part is not None for t in m.tensors.values())
    if count != stored:
        raise TornSnapshotError(where, f"manifest lists {stored} tensors in its files, the files hold {count}")
    return Source(Level.PARTS, fs, paths, [p.bytes for p in m.parts], headers, [p.xxh3_128 for p in m.parts],
                  manifest=m)


def probe_file(fs, root: str, names: Mapping[str, int], name: str, level: Level = Level.FULL) -> Source | None:
    if name not in names:
        return None
    path = join(root, name)
    return Source(level, fs, [path], [names[name]], read_headers(fs, [path], [names[name]]), [None])


def _probe_fallback(url: str, rank: int, version: str, storage_options) -> Source | None:
    fs, root = open_fs(url, storage_options)
    name = layout.full_name(rank, version)
    names = listing(fs, root)
    if name not in names:
        return None
    path = join(root, name)
    try:
        head = fs.cat_file(path, start=0, end=1)
        if head != b"\x80":  # not a pickle: FastDeploy would fail here, but a safetensors file is safe to read
            return probe_file(fs, root, names, name, Level.FALLBACK)
        raw = fs.cat_file(path)
    except FileNotFoundError as exc:
        raise vanished(fs, path, exc) from None
    arrays = load_state_pickle(raw, url_of(fs, path))
    return Source(Level.FALLBACK, fs, [path], [names[name]], [None], [None], arrays=arrays)


def probe_levels(
    snapshot_root: str, version: str, rank: int = 0, *, fallback_dir: str | None = None, strict: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Iterator[tuple[Level, str, Source | None | TornSnapshotError]]:
    """Each level in priority order with what is there: a complete Source, None (absent) or why it is torn."""
    layout.check_id(version)
    layout.check_rank(rank)
    fs, root = open_fs(snapshot_root, storage_options)
    names = listing(fs, root)
    base = join(root, layout.base_name(rank, version))
    probes = [
        (Level.PARTS, url_of(fs, base + ".part*.pdparams"),
         lambda: _probe_parts(fs, root, names, rank, version, strict)),
        (Level.FULL, url_of(fs, join(root, layout.full_name(rank, version))),
         lambda: probe_file(fs, root, names, layout.full_name(rank, version), Level.FULL)),
        (Level.LEGACY, url_of(fs, join(root, layout.legacy_name(version))),
         lambda: probe_file(fs, root, names, layout.legacy_name(version), Level.LEGACY)),
    ]
    if fallback_dir:
        where = f"{fallback_dir.rstrip('/')}/{layout.full_name(rank, version)}"
        probes.append((Level.FALLBACK, where, lambda: _probe_fallback(fallback_dir, rank, version, storage_options)))
    for level, where, probe in probes:
        try:
            yield level, where, probe()
        except TornSnapshotError as exc:
            yield level, where, exc


@storage_calls
def resolve(
    snapshot_root: str, version: str, rank: int = 0, *, fallback_dir: str | None = None, strict: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Source:
    """The highest-priority complete source, or an error that lists every place checked and its state."""
    checked: list[str] = []
    torn: list[TornSnapshotError] = []
    for level, where, found in probe_levels(snapshot_root, version, rank, fallback_dir=fallback_dir, strict=strict,
                                            storage_options=storage_options):
        if isinstance(found, Source):
            if torn:
                log.warning("loading %s from level %d (%s): a higher level is torn: %s", version, level,
                            level.label, "; ".join(map(str, torn)))
            return found
        if found is None:
            checked.append(f"level {level} ({level.label}): {where}: not found")
        else:
            torn.append(found)
            checked.append(f"level {level} ({level.label}): {found}")
    if not fallback_dir:
        checked.append(f"level 4 ({Level.FALLBACK.label}): not configured (fallback_dir=None)")
    if torn:
        raise TornSnapshotError(torn[0].path,
                                torn[0].reason + "; nothing else loads. Checked:\n  - " + "\n  - ".join(checked))
    raise SnapshotNotFoundError(layout.base_name(rank, version), checked)


def version_ranks(snapshot_root: str, version: str, storage_options) -> int:
    """How many ranks ``version`` was published as (its manifests must be ranks 0..n-1)."""
    ranks = sorted({parsed[0] for n in listing(*open_fs(snapshot_root, storage_options))
                    if (parsed := layout.parse_manifest_name(n)) and parsed[1] == version})
    if not ranks:
        raise SnapshotNotFoundError(version, [f"{snapshot_root}: no manifest of {version} (publish it first)"])
    if ranks != list(range(len(ranks))):
        raise TornSnapshotError(snapshot_root,
                                f"{version} has ranks {ranks}, not 0..{len(ranks) - 1}: publish it again")
    return len(ranks)


def checked_parts(snapshot_root: str, version: str, rank: int, storage_options) -> Source:
    src = resolve(snapshot_root, version, rank, strict=True, storage_options=storage_options)
    if src.level != layout.Level.PARTS or not all(src.checksums):
        raise TornSnapshotError(src.urls()[0], f"found at level {int(src.level)} ({src.level.label}), without "
                                "checksums: only versions published by Baton (parts and a manifest) are staged for "
                                "another engine; publish it with `baton publish`")
    return src
