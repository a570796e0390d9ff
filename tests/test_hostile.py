"""Hostile and racing snapshots: each ends in a SnapshotError (or OSError) naming the file, the target unchanged,
or a PartialApplyError that lists every tensor touched. Pickle attacks are in test_pickle_safe.py."""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import storage
from storage import layout
from storage.fs import open_fs
from tests.conftest import as_numpy, make_state, zeros_like
from tests.test_snapshot import PART, read, remove, write

REPO = Path(__file__).resolve().parents[1]
MANIFEST = layout.manifest_name(0, "h")
RESOLVE = sys.modules["storage.resolve"]  # the module; storage.resolve is the function


def published(root: str, seed: int = 3) -> dict:
    state = make_state(seed)
    storage.publish(state, root, "h", part_bytes=PART)
    return state


def snapshot_of(target: dict) -> dict:
    return {k: as_numpy(v).copy() for k, v in target.items()}


def assert_unchanged(target: dict, before: dict) -> None:
    for k, v in before.items():
        assert as_numpy(target[k]).tobytes() == v.tobytes(), f"{k} changed under an error"


def edit_manifest(root: str, change) -> None:
    doc = json.loads(read(root, MANIFEST))
    change(doc)
    write(root, MANIFEST, json.dumps(doc).encode())


def refused(root: str, match: str, verify: str = "full") -> None:
    target = zeros_like(make_state(3))
    before = snapshot_of(target)
    with pytest.raises(storage.SnapshotError, match=match) as err:
        storage.load_snapshot(root, "h", into=target, verify=verify)
    assert "model_state.tp0.h" in str(err.value)
    assert_unchanged(target, before)


# ---- manifests -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("digest", ["", None, "00", "z" * 32, 7])
@pytest.mark.parametrize("verify", ["full", "stream"])
def test_part_without_a_usable_checksum_is_refused(root, digest, verify):
    published(root)
    edit_manifest(root, lambda d: d["parts"][1].__setitem__("xxh3_128", digest))
    part = layout.part_name(0, "h", 1)
    data = read(root, part)
    write(root, part, data[:-1] + bytes([data[-1] ^ 1]))  # a flipped byte the skipped check would have missed
    refused(root, "xxh3_128", verify)


BAD_MANIFESTS = {
    "parts not a list": lambda d: d.__setitem__("parts", {"0": 1}),
    "zero parts": lambda d: d.__setitem__("parts", []),
    "rank a string": lambda d: d.__setitem__("rank", "0"),
    "bytes a float": lambda d: d["parts"][0].__setitem__("bytes", 1.5),
    "negative index": lambda d: d["parts"][0].__setitem__("index", -1),
    "shape too big": lambda d: next(iter(d["tensors"].values())).__setitem__("shape", [1 << 63]),
    "shape of strings": lambda d: next(iter(d["tensors"].values())).__setitem__("shape", ["4"]),
    "metadata a list": lambda d: d.__setitem__("metadata", [1]),
    "metadata values": lambda d: d.__setitem__("metadata", {"a": {"b": 1}}),
    "dtype unknown": lambda d: next(iter(d["tensors"].values())).__setitem__("dtype", "C64"),
    "part missing a field": lambda d: d["parts"][0].pop("tensors"),
}


@pytest.mark.parametrize("damage", BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_malformed_manifest_fields_are_refused(tmp_path, damage):
    root = str(tmp_path)
    published(root)
    edit_manifest(root, damage)
    refused(root, "manifest")


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"format": 1' + b"1" * 5000 + b"}", b"\xff\xfe",
                                 b'{"format": NaN}', b"[]"], ids=["deep", "5000 digits", "not utf-8", "NaN", "list"])
def test_unparseable_manifest_is_refused(tmp_path, raw):
    root = str(tmp_path)
    published(root)
    write(root, MANIFEST, raw)
    refused(root, "manifest|Baton")


def test_oversized_manifest_is_refused_before_download(tmp_path, monkeypatch):
    root = str(tmp_path)
    published(root)
    monkeypatch.setattr(RESOLVE, "MAX_MANIFEST_BYTES", 1000)
    refused(root, "over the 1000-byte limit")


def test_manifest_naming_another_file_as_a_part_says_so(tmp_path):
    root = str(tmp_path)
    published(root)
    edit_manifest(root, lambda d: d["parts"][0].__setitem__("file", layout.part_name(0, "h", 1)))
    refused(root, "names 'model_state.tp0.h.part1.pdparams' as part 0")


# ---- headers -----------------------------------------------------------------------------------------------

def header_file(header: bytes, data: bytes = b"") -> bytes:
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


BAD_HEADERS = {
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "5000 digits": b'{"a": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}',
    "metadata not a map": b'{"__metadata__": [1, 2]}',
    "metadata values": b'{"__metadata__": {"a": 1}}',
    "dim 2**63": b'{"a": {"dtype": "U8", "shape": [9223372036854775808, 0], "data_offsets": [0, 0]}}',
    "huge product": (b'{"a": {"dtype": "U8", "shape": [' + b",".join([b"4294967295"] * 60)
                     + b'], "data_offsets": [0, 0]}}'),
    "65 dims": b'{"a": {"dtype": "U8", "shape": [' + b",".join([b"1"] * 65) + b'], "data_offsets": [0, 1]}}',
    "bool dims": b'{"a": {"dtype": "U8", "shape": [true], "data_offsets": [0, 1]}}',
    "list dtype": b'{"a": {"dtype": ["U8"], "shape": [1], "data_offsets": [0, 1]}}',
    "extra key": b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}}',
    "not an object": b"[1]",
    "duplicate name": b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, '
                      b'"a": {"dtype": "U8", "shape": [0], "data_offsets": [1, 1]}}',
}


@pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_malformed_header_is_refused_naming_the_file(tmp_path, header):
    root = str(tmp_path)
    write(root, layout.full_name(0, "h"), header_file(header, b"\0"))
    target = {"a": np.zeros(1, np.uint8)}
    with pytest.raises(storage.TornSnapshotError, match="model_state.tp0.h.pdparams"):
        storage.load_snapshot(root, "h", into=target)
    assert target["a"][0] == 0


_HEADER_RSS = """
import resource, sys
from storage.tensorfile import parse_header
raw = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
header = parse_header(raw, "x", len(raw))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(header.entries), (after - before) * 1024)
"""


def test_header_parsing_costs_a_few_times_its_size(tmp_path):
    body = bytearray(b"{")
    for i in range(400_000):  # the worst case per byte that can be a real file: many one-byte tensors
        body += b'"t.%09d":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]},' % (i, i, i + 1)
    body[-1:] = b"}"
    path = tmp_path / "header.safetensors"
    path.write_bytes(header_file(bytes(body), b"\0" * 400_000))
    out = subprocess.run([sys.executable, "-c", _HEADER_RSS, str(path)], capture_output=True, text=True, cwd=REPO,
                         timeout=120, check=True).stdout.split()
    entries, grown = map(int, out)
    assert entries == 400_000
    size = len(body)
    assert grown <= 6 * size, f"a {size >> 20} MiB header grew RSS by {grown >> 20} MiB"


def test_a_header_of_empty_tensors_is_refused_before_it_is_parsed(tmp_path):
    """1.6 M zero-size entries (100 MiB of header, no data) once cost 1.1 GiB to parse before being refused."""
    from storage.tensorfile import parse_header

    entry = b'"t.%09d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
    body = b"{" + b",".join(entry % i for i in range(20_000)) + b"}"
    raw = header_file(body)
    with pytest.raises(storage.TornSnapshotError, match="header lists 20000 tensors for 0 bytes of data"):
        parse_header(raw, "x", len(raw))


# ---- targets and races -------------------------------------------------------------------------------------

def test_read_only_target_is_refused_before_any_write(tmp_path):
    root = str(tmp_path)
    state = published(root)
    target = {k: as_numpy(v).copy() * 0 for k, v in state.items()}
    locked = sorted(target)[-1]
    target[locked].flags.writeable = False
    before = snapshot_of(target)
    with pytest.raises(storage.IncompatibleTargetError, match="read-only"):
        storage.load_snapshot(root, "h", into=target)
    assert_unchanged(target, before)


def test_part_deleted_after_listing_is_a_torn_snapshot(tmp_path, monkeypatch):
    root = str(tmp_path)
    published(root)
    fs, path = open_fs(root)
    stale = storage.fs.listing(fs, path)
    monkeypatch.setattr(RESOLVE, "listing", lambda *_: dict(stale))
    remove(root, layout.part_name(0, "h", 2))
    refused(root, "part2.pdparams: disappeared")


@pytest.mark.parametrize("verify", ["full", "stream", "none"])
def test_part_truncated_between_check_and_apply(root, verify):
    state = published(root)
    src = storage.resolve(root, "h")
    part = layout.part_name(0, "h", 1)
    write(root, part, read(root, part)[:-3])
    target = zeros_like(state)
    before = snapshot_of(target)
    with pytest.raises(storage.SnapshotError, match="part1.pdparams") as err:
        storage.apply_source(src, target, verify=verify)
    if isinstance(err.value, storage.PartialApplyError):  # part 0 was written first: it must say so
        assert verify != "full" and err.value.applied
        changed = {k for k, v in before.items() if as_numpy(target[k]).tobytes() != v.tobytes()}
        assert changed <= set(err.value.applied)
    else:
        assert_unchanged(target, before)


def test_failure_midway_lists_every_tensor_touched(tmp_path):
    root = str(tmp_path)
    state = published(root)
    part = Path(root) / layout.part_name(0, "h", 1)
    calls: list[str] = []

    def copy_then_truncate(dst, src):  # the next part shrinks right after the first tensor lands
        dst.set_value(src)
        calls.append("x")
        if len(calls) == 1:
            part.write_bytes(part.read_bytes()[:200])

    target = zeros_like(state)
    with pytest.raises(storage.PartialApplyError, match="touched") as err:
        storage.load_snapshot(root, "h", into=target, copy_fn=copy_then_truncate, verify="none")
    assert "part1.pdparams" in str(err.value) and len(err.value.applied) == len(calls) >= 1
    for name in err.value.applied:
        assert np.array_equal(as_numpy(target[name]), as_numpy(state[name]))


def test_a_huge_rank_and_an_unreachable_root_are_named_in_their_errors():
    from flows.fleet import Server

    with pytest.raises(ValueError, match=r"rank '9{20}… \(5000 characters\)' in '#rank=' is not a rank number"):
        Server.parse("http://h:2#rank=" + "9" * 5000)
    with pytest.raises(ValueError, match=r"invalid rank '9+… \(5002 characters\)"):
        storage.load_snapshot("/nonexistent", "v", rank="9" * 5000)
    with pytest.raises(ConnectionError, match=r"ftp://127\.0\.0\.1:1/x: storage unreachable"):
        storage.load_snapshot("ftp://127.0.0.1:1/x", "v")


@pytest.mark.parametrize("rank", [10**5000, -(10**5000), "9" * 5000], ids=["int", "negative int", "str"])
def test_a_5000_digit_rank_is_refused_by_name_not_by_pythons_int_limit(tmp_path, rank):
    """An int too long for ``str`` (Python refuses past 4300 digits) or a string of 5000 digits: each storage call
    that takes a rank names it, cut short, and says what a rank is."""
    root = str(tmp_path / "snap")
    state = published(root)
    calls = {"load_snapshot": lambda: storage.load_snapshot(root, "h", rank=rank),
             "resolve": lambda: storage.resolve(root, "h", rank=rank),
             "publish": lambda: storage.publish(state, root, "h2", rank=rank),
             "part_name": lambda: layout.part_name(rank, "h", 0)}
    refusal = r"invalid rank .*\b500[0-2]\b.*a rank is an integer from 0 to 999999"  # its length is named
    for name, call in calls.items():
        with pytest.raises(ValueError, match=refusal) as err:
            call()
        assert "4300" not in str(err.value) and len(str(err.value)) < 160, (name, str(err.value)[:300])
    assert [v.version for v in storage.list_versions(root)] == ["h"]


def test_a_rank_given_as_text_is_checked_before_it_becomes_an_int():
    from storage.cli import parse_rank_argument

    assert layout.parse_rank("12") == 12
    for text in ("9" * 5000, "1000000", "-1", "１２", "1e3", ""):
        with pytest.raises(ValueError, match="a rank is an integer from 0 to 999999") as err:
            layout.parse_rank(text)
        assert len(str(err.value)) < 160
    with pytest.raises(argparse.ArgumentTypeError, match=r"invalid rank '9+… \(5002 characters\)"):
        parse_rank_argument("9" * 5000)
