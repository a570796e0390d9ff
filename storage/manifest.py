"""The manifest: the one object whose presence makes a snapshot exist.

Written last by the publisher; it pins every part's size and digests (``xxh3_128``, the fast check on every
load, and ``sha256`` for audits when the publisher was asked for it: about as slow as the write itself, so it is
null unless requested) and every
tensor's dtype, shape and part, so a reader can refuse a torn snapshot before it writes a byte. It also records the
digest of the rank's whole state (``storage.digest``); a delta's (format version 2) names its base and the base's
digest, so no loader applies it to anything else.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from dataclasses import dataclass, field

from .errors import TornSnapshotError
from .tensorfile import DTYPE_CODES, MAX_DIMS, MAX_HEADER_BYTES, parse_json

FORMAT = "baton.snapshot"
FORMAT_VERSION = 3  # the newest this reader knows; full versions are still written as 1, deltas as 3 (2: planes)
FULL_FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20  # ~500k tensors; refused before it is downloaded
SUM64 = re.compile(r"sum64-[0-9a-f]{32}")


@dataclass(frozen=True)
class PartRecord:
    file: str
    index: int
    bytes: int
    sha256: str | None  # only when published with sha256=True (``baton publish --sha256``)
    xxh3_128: str
    tensors: int
    # the file's header as written (its JSON without the padding spaces, and where its tensor bytes start): a
    # reader needs no probe of the file before it downloads it; None in manifests written before 2026-12-08
    header: str | None = None
    data_start: int | None = None

    def header_bytes(self) -> bytes | None:
        """The file's first ``data_start`` bytes as the manifest records them (length prefix and padding), or
        None. Checked like a header read from the file (``tensorfile.parse_header``) before it is used."""
        if self.header is None or self.data_start is None:
            return None
        text = self.header.encode()
        return struct.pack("<Q", self.data_start - 8) + text + b" " * (self.data_start - 8 - len(text))


@dataclass(frozen=True)
class TensorRecord:
    dtype: str
    shape: tuple[int, ...]
    part: int | None  # None only in a delta: the tensor is bit-identical to the base's


@dataclass(frozen=True)
class Base:
    """What a delta applies to: the base version and the digest of the base's rank state."""

    version: str
    digest: str


@dataclass
class Manifest:
    version: str
    rank: int
    published_at: float  # unix seconds; orders versions for `prune` and "newest"
    parts: list[PartRecord]
    tensors: dict[str, TensorRecord]
    metadata: dict[str, str] = field(default_factory=dict)
    digest: str | None = None  # the rank state's ``storage.digest``; None in manifests before deltas existed
    base: Base | None = None  # set for a delta
    depth: int = 0  # deltas since the nearest full version (0: this is one)
    sum64: str | None = None  # the rank state's ``storage.digest.sum64_digest``, what a GPU computes in place

    @property
    def is_delta(self) -> bool:
        return self.base is not None

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.parts)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION if self.is_delta else FULL_FORMAT_VERSION,
            "version": self.version,
            "id": self.version,  # the field's old name, for readers of the previous release: dropped in the next
            "rank": self.rank,
            "published_at": self.published_at,
            "parts": [_part_doc(p) for p in self.parts],
            "tensors": {n: {"dtype": t.dtype, "shape": list(t.shape), "part": t.part} for n, t in self.tensors.items()},
            "total_bytes": self.total_bytes,
            "total_tensors": len(self.tensors),
            "metadata": self.metadata,
            "digest": self.digest,
        }
        if self.sum64 is not None:
            doc["sum64"] = self.sum64
        if self.is_delta:
            doc.update(kind="delta", base={"version": self.base.version, "digest": self.base.digest}, depth=self.depth)
        return json.dumps(doc, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, path: str) -> Manifest:
        """Parse and type-check every field; anything off is a ``TornSnapshotError`` naming the field."""
        doc = parse_json(raw, path, "manifest")
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise TornSnapshotError(path, f"not a Baton manifest (format {str(found)[:80]!r})")
        version = doc.get("format_version")
        if not _is_int(version) or version > FORMAT_VERSION:
            raise TornSnapshotError(path, f"manifest format_version {str(version)[:40]!r} is newer than this Baton "
                                    f"understands ({FORMAT_VERSION}): upgrade baton")
        fields = _FieldReader(path)
        parts_doc = fields.get(doc, "parts", list)
        if not parts_doc:
            raise TornSnapshotError(path, "manifest lists no parts: not a complete publish; publish the version again")
        parts = []
        for i, p in enumerate(parts_doc):
            where = f"parts[{i}]"
            p = fields.of(p, where, dict)
            record = PartRecord(
                fields.get(p, "file", str, where), fields.count(p, "index", where), fields.count(p, "bytes", where),
                fields.digest(p, "sha256", 64, where, optional=True), fields.digest(p, "xxh3_128", 32, where),
                fields.count(p, "tensors", where))
            if "header" in p:
                header, start = fields.get(p, "header", str, where), fields.count(p, "data_start", where)
                size = len(header.encode())
                if not 8 + size <= start <= min(record.bytes, 8 + MAX_HEADER_BYTES):
                    raise TornSnapshotError(path, f"manifest field {where}.data_start = {start} does not fit its "
                                            f"{size}-byte header in a {record.bytes}-byte file")
                record = dataclasses.replace(record, header=header, data_start=start)
            parts.append(record)
        tensors = {}
        for name, t in fields.get(doc, "tensors", dict).items():
            where = f"tensors[{name[:80]!r}]"
            t = fields.of(t, where, dict)
            shape = fields.get(t, "shape", list, where)
            if len(shape) > MAX_DIMS or not all(_is_int(d) and 0 <= d < 1 << 63 for d in shape):
                raise TornSnapshotError(path, f"manifest field {where}.shape is not a list of at most {MAX_DIMS} sizes "
                                        "in [0, 2**63)")
            dtype = fields.get(t, "dtype", str, where)
            if dtype not in DTYPE_CODES:
                raise TornSnapshotError(path, f"manifest field {where}.dtype {dtype[:20]!r} is not a safetensors dtype")
            part = None if t.get("part", 0) is None and doc.get("kind") == "delta" else fields.count(t, "part", where)
            tensors[name] = TensorRecord(dtype, tuple(shape), part)
        metadata = doc.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise TornSnapshotError(path, "manifest field metadata must map strings to strings")
        published_at = fields.get(doc, "published_at", (int, float))
        named = fields.get(doc, "version" if "version" in doc else "id", str)  # "id" in manifests before 2026-12
        digest = fields.digest(doc, "digest", 32, "", optional=True) if "digest" in doc else None
        base, depth = None, 0
        if doc.get("kind", "full") != "full":
            if doc.get("kind") != "delta":
                raise TornSnapshotError(path, f"manifest kind {str(doc.get('kind'))[:20]!r} is not 'full' or 'delta'")
            b = fields.get(doc, "base", dict)
            base = Base(fields.get(b, "version", str, "base"), fields.digest(b, "digest", 32, "base"))
            depth = fields.count(doc, "depth")
            if digest is None or depth < 1:
                raise TornSnapshotError(path, "a delta manifest needs its own digest and a depth of at least 1")
        sum64 = fields.get(doc, "sum64", str) if "sum64" in doc else None
        if sum64 is not None and not SUM64.fullmatch(sum64):
            raise TornSnapshotError(path, f"manifest field sum64 {sum64[:60]!r} is not 'sum64-' and 32 lowercase hex "
                                    "digits")
        m = cls(named, fields.count(doc, "rank"), float(published_at), parts, tensors, metadata, digest, base, depth,
                sum64)
        if [p.index for p in parts] != list(range(len(parts))):
            raise TornSnapshotError(path, "manifest parts are not numbered 0..N-1")
        for name, t in tensors.items():
            if t.part is not None and t.part >= len(parts):
                raise TornSnapshotError(path, f"manifest puts tensor {name[:80]!r} in part {t.part}, which it does "
                                        "not list")
        return m


def _part_doc(p: PartRecord) -> dict:
    doc = dataclasses.asdict(p)
    if p.header is None:
        del doc["header"], doc["data_start"]
    return doc


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _FieldReader:
    """Typed access to a parsed JSON document; every refusal names the file and the field."""

    def __init__(self, path: str):
        self.path = path

    def of(self, value: object, where: str, kind) -> object:
        if not isinstance(value, kind) or isinstance(value, bool):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise TornSnapshotError(self.path, f"manifest field {where} is a {type(value).__name__}, expected {names}")
        return value

    def get(self, doc: dict, key: str, kind, where: str = "") -> object:
        name = f"{where}.{key}" if where else key
        if key not in doc:
            raise TornSnapshotError(self.path, f"manifest field {name} is missing")
        return self.of(doc[key], name, kind)

    def count(self, doc: dict, key: str, where: str = "") -> int:
        value = self.get(doc, key, int, where)
        if not 0 <= value < 1 << 63:
            raise TornSnapshotError(self.path, f"manifest field {where}.{key} = {value} is out of range")
        return value

    def digest(self, doc: dict, key: str, hex_digits: int, where: str, optional: bool = False) -> str | None:
        if optional and doc.get(key, "") is None:
            return None
        value = self.get(doc, key, str, where)
        if len(value) != hex_digits or value.strip("0123456789abcdef"):
            raise TornSnapshotError(self.path, f"manifest field {where}.{key} is not a {hex_digits}-digit hex digest: "
                                    "refusing a part that cannot be checked; publish the version again")
        return value
