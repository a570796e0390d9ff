"""The byte format and names, pinned: golden bytes, safetensors interop, id rules, part ordering."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import paddle
import pytest
import safetensors.numpy as stn
import safetensors.paddle as stp

from storage import layout
from storage.errors import TornSnapshotError
from storage.tensorfile import encode_header, parse_header
from storage.writer import _describe, _raw_bytes, plan_parts


def part_bytes(state: dict) -> bytes:
    items = [_describe(k, v) for k, v in state.items()]
    header = encode_header([(i.name, i.code, i.shape, i.nbytes) for i in items], {"format": "pd"})
    return header + b"".join(_raw_bytes(i).tobytes() for i in items)


def test_golden_bytes():
    data = part_bytes({"a": np.arange(3, dtype=np.float32), "b": np.array([[1, 2]], dtype=np.int64)})
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    assert data[8 : 8 + n].rstrip(b" ") == (
        b'{"__metadata__":{"format":"pd"},"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},'
        b'"b":{"dtype":"I64","shape":[1,2],"data_offsets":[12,28]}}')
    assert hashlib.sha256(data).hexdigest() == "5a0c94a0da94341a179e1137809f854e2d6309d6501493226f9d56ff77a8fd59"
    assert data[8 + n :] == np.arange(3, dtype=np.float32).tobytes() + np.array([1, 2], np.int64).tobytes()
    # the reference implementation reads it the same
    loaded = stn.load(data)
    np.testing.assert_array_equal(loaded["a"], np.arange(3, dtype=np.float32))
    np.testing.assert_array_equal(loaded["b"], [[1, 2]])


def test_output_is_deterministic():
    state = {"x": np.ones((4, 4), np.float16), "y": np.zeros(5, np.uint8)}
    assert part_bytes(state) == part_bytes(dict(state))


def test_reads_what_the_safetensors_library_writes_including_bfloat16():
    state = {"w": paddle.randn([5, 3]).astype("bfloat16"), "v": paddle.arange(4, dtype="int32")}
    data = stp.save(state)
    header = parse_header(data, "mem", len(data))
    entries = {e.name: e for e in header.entries}
    assert entries["w"].dtype == "BF16" and entries["w"].shape == (5, 3)
    raw = np.frombuffer(data, np.uint8)[entries["w"].start : entries["w"].end]
    np.testing.assert_array_equal(raw.view(np.uint16).reshape(5, 3), state["w"].view(paddle.uint16).numpy())


@pytest.mark.parametrize("cut", [4, 20, -1])
def test_truncated_headers_are_torn(cut):
    data = part_bytes({"a": np.arange(10, dtype=np.float32)})
    with pytest.raises(TornSnapshotError):
        parse_header(data[:cut], "f", len(data[:cut]))


def test_overlapping_offsets_are_torn():
    body = (b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    body += b" " * (-len(body) % 8)
    data = struct.pack("<Q", len(body)) + body + b"\0" * 8
    with pytest.raises(TornSnapshotError, match="hole or overlap"):
        parse_header(data, "f", len(data))


def test_pickle_under_safetensors_name_is_explained(tmp_path):
    paddle.save({"w": paddle.ones([3])}, str(tmp_path / "w.pdparams"))
    for data in (b"\x80\x04" + b"\0" * 16, (tmp_path / "w.pdparams").read_bytes()):
        with pytest.raises(TornSnapshotError, match="pickle"):
            parse_header(data, "f", len(data))


def test_header_whose_length_starts_with_the_pickle_byte_is_safetensors():
    for pad in range(0, 300, 8):  # find metadata that makes the header length 0x80 modulo 256, like a pickle's 0x80
        data = encode_header([("a", "F32", (1,), 4)], {"m": "x" * pad}) + b"\0" * 4
        if data[0] == 0x80:
            break
    assert data[0] == 0x80
    assert [e.name for e in parse_header(data, "f", len(data)).entries] == ["a"]


def test_names_match_fastdeploy():
    assert layout.part_name(3, "12", 4) == "model_state.tp3.12.part4.pdparams"
    assert layout.full_name(3, "12") == "model_state.tp3.12.pdparams"
    assert layout.legacy_name("12") == "model_state.tp012.pdparams"
    assert layout.manifest_name(1, "step-9") == "model_state.tp1.step-9.manifest.json"
    names = ["model_state.tp0.v.part10.pdparams", "model_state.tp0.v.part2.pdparams",
             "model_state.tp0.v.part1.pdparams"]
    index = {n: int(layout.part_regex(0, "v").fullmatch(n).group(1)) for n in names}  # ordered by number, not text
    assert sorted(names, key=index.get) == names[::-1]
    assert layout.part_regex(1, "2").fullmatch("model_state.tp12.part0.pdparams") is None


@pytest.mark.parametrize("rank", [-1, 1.5, "0", True])
def test_bad_ranks_are_refused(rank):
    with pytest.raises(ValueError, match="invalid rank"):
        layout.part_name(rank, "v", 0)


def test_plan_parts_bounds_and_keeps_order():
    items = [_describe(f"t{i}", np.zeros(n, np.uint8)) for i, n in enumerate([40, 70, 200, 10, 10, 90])]
    parts = plan_parts(items, 100)
    assert [[i.name for i in p] for p in parts] == [["t0"], ["t1"], ["t2"], ["t3", "t4"], ["t5"]]
    assert all(sum(i.nbytes for i in p) <= 100 or len(p) == 1 for p in parts)


def test_a_manifest_names_its_version_and_still_reads_the_old_field(tmp_path):
    import json

    import storage
    from storage.manifest import Manifest

    storage.publish({"w": np.ones(4, np.float32)}, str(tmp_path), "step-7")
    raw = (tmp_path / layout.manifest_name(0, "step-7")).read_bytes()
    doc = json.loads(raw)
    assert doc["version"] == doc["id"] == "step-7"  # the old name too, for readers of the previous release
    del doc["version"]  # a manifest written before the rename
    assert Manifest.from_json(json.dumps(doc).encode(), "m").version == "step-7"
    assert storage.list_versions(str(tmp_path))[0].version == "step-7"
    assert not hasattr(storage.list_versions(str(tmp_path))[0], "id")  # the one-release alias is gone


def _published(root: str, part_bytes: int = 1 << 20) -> dict:
    import storage

    rng = np.random.default_rng(0)
    state = {f"w{i}": rng.standard_normal((64, 128)).astype(np.float32) for i in range(8)}  # 32 KiB each
    storage.publish(state, root, "v1", part_bytes=part_bytes)
    return state


def _root(tmp_path, where: str) -> str:
    """A local directory, or fsspec's in-memory filesystem: remote to Baton, as an object store is."""
    return str(tmp_path) if where == "file" else f"memory://{tmp_path.name}"


def _doc(root: str, name: str) -> dict:
    import json

    import storage

    return json.loads(storage.open_fs(root)[0].cat_file(f"{storage.open_fs(root)[1]}/{name}"))


def _write_doc(root: str, name: str, doc: dict) -> None:
    import json

    import storage

    fs, path = storage.open_fs(root)
    fs.pipe_file(f"{path}/{name}", json.dumps(doc).encode())


def test_a_manifest_records_each_files_header_so_a_remote_load_probes_no_file(tmp_path, monkeypatch):
    import importlib

    import storage

    resolve_module = importlib.import_module("storage.resolve")  # the package exports a function of the same name
    root = _root(tmp_path, "memory")
    state = _published(root, part_bytes=100 << 10)
    fs, path = storage.open_fs(root)
    doc = _doc(root, layout.manifest_name(0, "v1"))
    assert len(doc["parts"]) == 3
    for p in doc["parts"]:  # the header the file starts with, byte for byte (the padding is implied)
        raw = fs.cat_file(f"{path}/{p['file']}")
        (length,) = struct.unpack("<Q", raw[:8])
        assert p["data_start"] == 8 + length and raw[8:8 + length].rstrip(b" ").decode() == p["header"]

    def no_probe(*args, **kwargs):
        raise AssertionError("a part's header was probed")

    monkeypatch.setattr(resolve_module, "read_headers", no_probe)
    target = {n: np.zeros_like(a) for n, a in state.items()}
    for verify in ("stream", "full", "none"):
        storage.load_snapshot(root, "v1", into=target, verify=verify)
        for n in state:
            np.testing.assert_array_equal(target[n], state[n])
            target[n][:] = 0


@pytest.mark.parametrize("where", ["file", "memory"])
def test_a_manifest_without_recorded_headers_still_loads_by_probing(tmp_path, where):
    import storage

    root = _root(tmp_path, where)
    state = _published(root)
    doc = _doc(root, layout.manifest_name(0, "v1"))
    for p in doc["parts"]:  # as written before 2026-12-08
        del p["header"], p["data_start"]
    _write_doc(root, layout.manifest_name(0, "v1"), doc)
    target = {n: np.zeros_like(a) for n, a in state.items()}
    storage.load_snapshot(root, "v1", into=target)
    for n in state:
        np.testing.assert_array_equal(target[n], state[n])


@pytest.mark.parametrize("where", ["file", "memory"])
@pytest.mark.parametrize("verify", ["stream", "full", "none"])
def test_a_part_whose_header_differs_from_the_recorded_one_is_refused_before_a_byte_is_placed(tmp_path, where,
                                                                                             verify):
    """Another file under the last part's name with the same size and tensors in another order: its bytes would
    land in the wrong tensors by the recorded layout. Its own header gives it away before the target changes."""
    import storage

    root = _root(tmp_path, where)
    state = _published(root, part_bytes=100 << 10)
    fs, path = storage.open_fs(root)
    last = f"{path}/{layout.part_name(0, 'v1', 2)}"
    names = [e.name for e in storage.resolve(root, "v1").headers[2].entries]
    order = [names[1], names[0], *names[2:]]  # the first two swapped: the same header length, another layout
    header = encode_header([(n, "F32", state[n].shape, state[n].nbytes) for n in order], {"format": "pd"})
    data = header + b"".join(state[n].tobytes() for n in order)
    assert len(data) == fs.size(last)
    fs.pipe_file(last, data)
    target = {n: np.zeros_like(a) for n, a in state.items()}
    if where == "file" and verify != "full":  # found as that part is read, after the parts before it: the caller
        with pytest.raises(storage.PartialApplyError, match="part2.pdparams: its header differs"):  # restores
            storage.load_snapshot(root, "v1", into=target, verify=verify)
        return
    why = "does not match the manifest" if where == "file" else "part2.pdparams: its header differs"
    with pytest.raises(TornSnapshotError, match=why):  # a remote part's header is compared before the first write
        storage.load_snapshot(root, "v1", into=target, verify=verify)
    assert not any(a.any() for a in target.values())


@pytest.mark.parametrize("field, value, why", [
    ("data_start", 4, "does not fit"),
    ("data_start", 1 << 40, "does not fit"),
    ("header", 5, "expected str"),
    ("header", '{"w0":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', "header describes 588"),
])
def test_a_forged_recorded_header_is_refused_naming_the_manifest(tmp_path, field, value, why):
    import storage

    root = _root(tmp_path, "memory")
    state = _published(root)
    doc = _doc(root, layout.manifest_name(0, "v1"))
    doc["parts"][0][field] = value
    _write_doc(root, layout.manifest_name(0, "v1"), doc)
    with pytest.raises(TornSnapshotError, match=why) as exc:
        storage.load_snapshot(root, "v1", into={n: np.zeros_like(a) for n, a in state.items()})
    assert "manifest" in str(exc.value)


def test_an_s3_load_fetches_its_manifest_and_parts_and_nothing_else(s3_endpoint, s3_fetched):
    """No ranged probe of each part's header before the download: one GET for the manifest, one per part."""
    from conftest import BUCKET

    import storage

    rng = np.random.default_rng(1)
    state = {f"w{i}": rng.standard_normal((64, 128)).astype(np.float32) for i in range(8)}
    root = f"s3://{BUCKET}/exact"
    storage.publish(state, root, "v1", part_bytes=100 << 10)
    fs = storage.open_fs(root)[0]
    expected = sorted(fs.size(f"{BUCKET}/exact/{name}") for name in
                      [layout.manifest_name(0, "v1"), *(layout.part_name(0, "v1", i) for i in range(3))])
    target = {n: np.zeros_like(a) for n, a in state.items()}
    s3_fetched.start()
    storage.load_snapshot(root, "v1", into=target)
    assert sorted(s3_fetched) == expected
    for n in state:
        np.testing.assert_array_equal(target[n], state[n])
