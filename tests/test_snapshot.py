"""Publish/load conformance, run on local disk, memory:// and a real S3 server on loopback."""

from __future__ import annotations

import numpy as np
import paddle
import pytest
import safetensors.paddle as stp

import storage
from storage import layout
from storage.fs import join, open_fs
from tests.conftest import BUCKET, assert_same, make_state, zeros_like

PART = 8 << 10  # small parts so every state dict spans several


def files(root: str) -> dict[str, int]:
    from storage.fs import listing

    fs, path = open_fs(root)
    return listing(fs, path)


def write(root: str, name: str, data: bytes) -> None:
    fs, path = open_fs(root)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(join(path, name), data)


def read(root: str, name: str) -> bytes:
    fs, path = open_fs(root)
    return fs.cat_file(join(path, name))


def remove(root: str, name: str) -> None:
    fs, path = open_fs(root)
    fs.rm_file(join(path, name))


def save_safetensors(root: str, name: str, state: dict) -> None:
    write(root, name, stp.save({k: v.contiguous() for k, v in state.items()}))


def test_round_trip_into_dict_and_layer(root):
    state = make_state(1)
    report = storage.publish(state, root, "v1", part_bytes=PART)
    assert report.parts >= 3
    assert report.bytes == sum(files(root)[f"model_state.tp0.v1.part{i}.pdparams"] for i in range(report.parts))
    target = zeros_like(state)
    ptrs = {k: v.data_ptr() for k, v in target.items()}
    loaded = storage.load_snapshot(root, "v1", into=target)
    assert_same(target, state)
    assert {k: v.data_ptr() for k, v in target.items()} == ptrs, "must write in place, not rebind"
    assert (loaded.level, loaded.version, loaded.tensors, loaded.bytes) == (1, "v1", len(state), report.bytes)
    assert len(loaded.files) == report.parts and "while applying" in loaded.verified
    again = zeros_like(state)
    assert "before apply" in storage.load_snapshot(root, "v1", into=again, verify="full").verified
    assert_same(again, state)

    layer = paddle.nn.Linear(16, 8)
    storage.publish(layer.state_dict(), root, "lin", rank=3)
    fresh = paddle.nn.Linear(16, 8)
    storage.load_snapshot(root, "lin", rank=3, into=fresh)
    assert_same(fresh.state_dict(), layer.state_dict())


def test_manifest_is_last_and_complete(root):
    state = make_state(2)
    storage.publish(state, root, "v2", part_bytes=PART)
    import json

    m = json.loads(read(root, "model_state.tp0.v2.manifest.json"))
    assert m["format"] == "baton.snapshot" and m["id"] == "v2" and m["rank"] == 0
    assert m["total_bytes"] == sum(p["bytes"] for p in m["parts"])
    assert set(m["tensors"]) == set(state) and m["total_tensors"] == len(state)
    assert all(p["sha256"] is None and len(p["xxh3_128"]) == 32 for p in m["parts"])  # sha256 only on request
    storage.publish(state, root, "audited", part_bytes=PART, sha256=True)
    m = json.loads(read(root, "model_state.tp0.audited.manifest.json"))
    assert all(len(p["sha256"]) == 64 for p in m["parts"])
    assert m["tensors"]["layers.0.mlp.down.weight"]["dtype"] == "BF16"
    assert not any(n.endswith(".publishing") for n in files(root)), "pending marker removed after commit"


def test_part_order_is_numeric_not_lexical(root):
    state = {f"t{i:02d}": paddle.full([256], float(i)) for i in range(12)}
    storage.publish(state, root, "many", part_bytes=1024)  # one tensor per part: part10, part11 sort before part2
    assert "model_state.tp0.many.part11.pdparams" in files(root)
    target = {k: paddle.zeros([256]) for k in state}
    storage.load_snapshot(root, "many", into=target)
    assert_same(target, state)


def test_levels_are_tried_in_priority_order(root, tmp_path):
    v_parts, v_full, v_legacy, v_fallback = (make_state(s) for s in (10, 20, 30, 40))
    fallback = str(tmp_path / "shared_ipc_meta")
    import os

    os.makedirs(fallback)
    paddle.save(v_fallback, os.path.join(fallback, "model_state.tp0.7.pdparams"))
    t = zeros_like(v_parts)
    assert storage.load_snapshot(root, "7", into=t, fallback_dir=fallback).level == 4
    assert_same(t, v_fallback)
    save_safetensors(root, "model_state.tp07.pdparams", v_legacy)
    assert storage.load_snapshot(root, "7", into=t, fallback_dir=fallback).level == 3
    assert_same(t, v_legacy)
    save_safetensors(root, "model_state.tp0.7.pdparams", v_full)
    assert storage.load_snapshot(root, "7", into=t, fallback_dir=fallback).level == 2
    assert_same(t, v_full)
    storage.publish(v_parts, root, "7", part_bytes=PART)
    report = storage.load_snapshot(root, "7", into=t, fallback_dir=fallback)
    assert (report.level, report.source) == (1, "chunked parts")
    assert_same(t, v_parts)


def test_fastdeploy_parts_without_manifest_load_in_compat_mode(root):
    state = make_state(5)
    names = list(state)
    save_safetensors(root, "model_state.tp2.9.part0.pdparams", {k: state[k] for k in names[:3]})
    save_safetensors(root, "model_state.tp2.9.part1.pdparams", {k: state[k] for k in names[3:]})
    t = zeros_like(state)
    report = storage.load_snapshot(root, "9", rank=2, into=t)
    assert report.level == 1 and "no manifest" in report.verified
    assert_same(t, state)
    with pytest.raises(storage.TornSnapshotError, match="manifest missing"):
        storage.load_snapshot(root, "9", rank=2, into=zeros_like(state), strict=True)


def test_manifest_less_parts_may_be_numbered_from_any_start_but_not_with_gaps(root):
    """FastDeploy sorts parts by their number, and its own tests number them from 1."""
    state = make_state(8)
    names = list(state)
    thirds = [names[:2], names[2:4], names[4:]]
    for n, chunk in zip((1, 2, 3), thirds):
        save_safetensors(root, f"model_state.tp0.fd.part{n}.pdparams", {k: state[k] for k in chunk})
    t = zeros_like(state)
    report = storage.load_snapshot(root, "fd", into=t)
    assert report.level == 1 and [f.rsplit(".part", 1)[1] for f in report.files] == ["1.pdparams", "2.pdparams",
                                                                                       "3.pdparams"]
    assert_same(t, state)
    remove(root, "model_state.tp0.fd.part2.pdparams")
    with pytest.raises(storage.TornSnapshotError, match="part 2 is missing"):
        storage.load_snapshot(root, "fd", into=zeros_like(state))


def test_baton_parts_load_with_paddle_safetensors(root, tmp_path):
    state = make_state(3)
    report = storage.publish(state, root, "fd", part_bytes=PART)
    merged = {}
    for i in range(report.parts):
        local = tmp_path / f"p{i}.pdparams"
        local.write_bytes(read(root, f"model_state.tp0.fd.part{i}.pdparams"))
        merged.update(paddle.load(str(local), safetensors=True))  # exactly how FastDeploy reads a part
    assert_same(merged, state)
    assert all(merged[k].dtype == state[k].dtype for k in state)


def assert_untouched(target: dict, before: dict) -> None:
    assert_same(target, before)


@pytest.mark.parametrize("damage", ["truncate", "gap", "flip", "drop_manifest_strict", "pending", "extra_part", "size"])
def test_torn_snapshots_are_refused_and_target_untouched(root, damage):
    state = make_state(4)
    report = storage.publish(state, root, "t", part_bytes=PART)
    part1 = "model_state.tp0.t.part1.pdparams"
    data = read(root, part1)
    strict = False
    if damage == "truncate":
        write(root, part1, data[:-10])
    elif damage == "gap":
        remove(root, "model_state.tp0.t.manifest.json")
        remove(root, part1)
    elif damage == "flip":  # same size, one bit different: only the checksum can tell
        write(root, part1, data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "drop_manifest_strict":
        remove(root, "model_state.tp0.t.manifest.json")
        strict = True
    elif damage == "pending":  # a publisher killed before its manifest
        remove(root, "model_state.tp0.t.manifest.json")
        write(root, layout.pending_name(0, "t"), b"{}")
    elif damage == "extra_part":
        write(root, f"model_state.tp0.t.part{report.parts}.pdparams", data)
    elif damage == "size":
        write(root, part1, data + b"\0" * 8)
    target = make_state(99)
    before = {k: v.clone() for k, v in target.items()}
    with pytest.raises(storage.TornSnapshotError) as err:  # a flip needs the checksum before the first write
        storage.load_snapshot(root, "t", into=target, strict=strict, verify="full" if damage == "flip" else "stream")
    assert "model_state.tp0.t." in str(err.value)
    assert_untouched(target, before)


def test_a_corrupt_part_under_the_default_is_caught_before_it_is_used(root):
    """The default reads once: a flipped byte in part 1 is found while part 1 is applied. Its error names every
    tensor that changed, so the caller (the server) knows to restore; fresh tensors are never returned."""
    state = make_state(4)
    storage.publish(state, root, "t", part_bytes=PART)
    part1 = "model_state.tp0.t.part1.pdparams"
    data = read(root, part1)
    write(root, part1, data[:-1] + bytes([data[-1] ^ 1]))
    target = make_state(99)
    before = {k: v.clone() for k, v in target.items()}
    with pytest.raises(storage.PartialApplyError, match=part1) as err:
        storage.load_snapshot(root, "t", into=target)
    changed = {k for k in target if not np.array_equal(target[k].numpy(), before[k].numpy())}
    assert changed and changed <= set(err.value.applied)
    with pytest.raises(storage.TornSnapshotError, match=part1):
        storage.load_snapshot(root, "t")  # into=None: nothing half-built comes back


@pytest.mark.parametrize("verify", ["stream", "full"])
def test_s3_loads_download_every_byte_once(s3_endpoint, verify, s3_fetched):
    """Bytes fetched from the S3 server per load, counted from its replies: the snapshot plus its manifest, which
    records every file's header (no probe of them), in either checksum mode (``full`` spools the parts locally
    instead of fetching them twice)."""
    root = f"s3://{BUCKET}/once-{verify}"
    # parts above s3fs's 50 MiB block size, which it would download in ranges after an abandoned full GET
    state = {"big": paddle.rand([56, 1 << 18]), **{f"w{i}": paddle.rand([256, 1024]) for i in range(3)}}
    report = storage.publish(state, root, "v", part_bytes=1 << 20)
    manifest = len(read(root, "model_state.tp0.v.manifest.json"))
    fetched = s3_fetched
    fetched.start()
    target = zeros_like(state)
    storage.load_snapshot(root, "v", into=target, verify=verify)
    assert_same(target, state)
    assert sum(fetched) - manifest == report.bytes, (fetched, report.bytes)


def test_torn_higher_level_falls_back_to_complete_lower_level(root):
    state, full = make_state(6), make_state(7)
    storage.publish(state, root, "f", part_bytes=PART)
    remove(root, "model_state.tp0.f.part0.pdparams")
    save_safetensors(root, "model_state.tp0.f.pdparams", full)
    t = zeros_like(state)
    assert storage.load_snapshot(root, "f", into=t).level == 2
    assert_same(t, full)


def test_truncated_single_file_is_refused(root):
    state = make_state(8)
    save_safetensors(root, "model_state.tp0.s.pdparams", state)
    write(root, "model_state.tp0.s.pdparams", read(root, "model_state.tp0.s.pdparams")[:-100])
    with pytest.raises(storage.TornSnapshotError, match="truncated"):
        storage.load_snapshot(root, "s", into=zeros_like(state))


def test_nothing_found_lists_every_place(root, tmp_path):
    with pytest.raises(storage.SnapshotNotFoundError) as err:
        storage.load_snapshot(root, "nope", rank=1, into={}, fallback_dir=str(tmp_path))
    msg = str(err.value)
    for needle in ("model_state.tp1.nope.part*.pdparams", "model_state.tp1.nope.pdparams",
                   "model_state.tp0nope.pdparams", str(tmp_path)):
        assert needle in msg
    assert isinstance(err.value, FileNotFoundError)


@pytest.mark.parametrize("bad", ["../x", "a/b", "v 1", "", "v1.part3", ".hidden", "x" * 200, 5])
def test_bad_ids_are_refused(root, bad):
    with pytest.raises(ValueError, match="invalid snapshot id"):
        storage.publish({"a": paddle.ones([1])}, root, bad)
    with pytest.raises(ValueError, match="invalid snapshot id"):
        storage.load_snapshot(root, bad, into={})


def test_incompatible_target_is_refused_before_any_write(root):
    state = make_state(9)
    storage.publish(state, root, "x", part_bytes=PART)
    for mutate, needle in (
        (lambda t: t.__setitem__("embed.weight", paddle.zeros([63, 32])), "shape"),
        (lambda t: t.__setitem__("layers.0.odd", paddle.zeros([3, 5, 7], dtype="float64")), "dtype"),
        (lambda t: t.pop("step"), "unexpected tensor"),
        (lambda t: t.__setitem__("extra", paddle.zeros([1])), "missing tensor"),
    ):
        target = make_state(11)
        mutate(target)
        before = {k: v.clone() for k, v in target.items()}
        with pytest.raises(storage.IncompatibleTargetError, match=needle):
            storage.load_snapshot(root, "x", into=target)
        assert_untouched(target, before)


def test_cast_loads_float32_into_bfloat16(root):
    state = {"w": paddle.randn([17, 9])}
    storage.publish(state, root, "c")
    target = {"w": paddle.zeros([17, 9], dtype="bfloat16")}
    storage.load_snapshot(root, "c", into=target, cast=True)
    np.testing.assert_array_equal(target["w"].astype("float32").numpy(),
                                  state["w"].astype("bfloat16").astype("float32").numpy())


def test_into_none_returns_fresh_tensors(root):
    state = make_state(12)
    storage.publish(state, root, "n", part_bytes=PART)
    report = storage.load_snapshot(root, "n")
    assert_same(report.state_dict, state)
    assert report.state_dict["layers.0.mlp.down.weight"].dtype == paddle.bfloat16


def test_republish_refused_unless_overwrite(root):
    storage.publish(make_state(1), root, "r", part_bytes=PART)
    with pytest.raises(storage.SnapshotExistsError, match="overwrite"):
        storage.publish(make_state(2), root, "r", part_bytes=PART)
    small = {"only": paddle.ones([4])}
    storage.publish(small, root, "r", overwrite=True)
    assert [n for n in files(root) if n.startswith("model_state.tp0.r.part")] == ["model_state.tp0.r.part0.pdparams"]
    t = {"only": paddle.zeros([4])}
    storage.load_snapshot(root, "r", into=t)
    assert_same(t, small)


def test_list_and_prune_versions(root):
    for i in range(4):
        storage.publish({"w": paddle.full([8], float(i))}, root, f"s{i}")
        storage.publish({"w": paddle.full([8], float(i))}, root, f"s{i}", rank=1)
    assert [v.version for v in storage.list_versions(root)] == ["s0", "s1", "s2", "s3"]
    assert storage.list_versions(root)[0].ranks == (0, 1)
    removed = storage.prune(root, keep_last=2, keep=["s0"])
    assert removed == ["s1"]
    assert [v.version for v in storage.list_versions(root)] == ["s0", "s2", "s3"]
    assert not any(".s1." in n for n in files(root))
    with pytest.raises(ValueError):
        storage.prune(root, keep_last=0)


def test_stream_verify_reports_partial_apply(root):
    state = make_state(13)
    storage.publish(state, root, "p", part_bytes=PART)
    last = storage.list_versions(root)[0]
    part = f"model_state.tp0.p.part{2}.pdparams"
    data = read(root, part)
    write(root, part, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(storage.PartialApplyError) as err:
        storage.load_snapshot(root, "p", into=zeros_like(state), verify="stream")
    assert err.value.applied and part in str(err.value) and last.version == "p"


def test_large_parts_put_tensor_bytes_on_page_boundaries(tmp_path):
    """Bytes that start on a page in the file copy into live tensors faster; a part of a MiB or more is laid out
    so (whole-page tensors first), and stays a plain safetensors file for FastDeploy's reader."""
    state = {"a": paddle.rand([256, 1024]), "norm": paddle.rand([7]), "b": paddle.rand([512, 1024])}
    storage.publish(state, str(tmp_path), "v", part_bytes=64 << 20)
    header = storage.resolve(str(tmp_path), "v").headers[0]
    starts = {e.name: e.start for e in header.entries}
    assert starts["a"] % 4096 == 0 and starts["b"] % 4096 == 0 and starts["norm"] > starts["b"]
    assert_same(paddle.load(str(tmp_path / "model_state.tp0.v.part0.pdparams"), safetensors=True), state)


def test_without_room_to_spool_remote_parts_are_fetched_into_memory(monkeypatch, caplog):
    import collections
    import uuid

    root = f"memory://nospool-{uuid.uuid4().hex}"
    state = make_state(6)
    storage.publish(state, root, "v", part_bytes=PART)
    monkeypatch.setattr("storage.apply.shutil.disk_usage", lambda path: collections.namedtuple("u", "free")(0))
    for verify in ("stream", "full"):
        target = zeros_like(state)
        storage.load_snapshot(root, "v", into=target, verify=verify)
        assert_same(target, state)
    assert "no room" in caplog.text


def test_tensors_made_on_any_thread_are_eager_paddle_tensors(tmp_path):
    """Paddle is eager only on the thread that imported it; publishing ranks on task threads must still get
    ``paddle.Tensor`` (not static-mode ``DenseTensor``) from every reader, whichever thread imports Paddle."""
    import subprocess
    import sys

    state = make_state(7)
    paddle.save(state, str(tmp_path / "ckpt.pdparams"))
    storage.publish(state, str(tmp_path / "snap"), "v", part_bytes=PART)
    code = f"""
import threading
from storage import read_state_file
import storage
found = []
def read():
    found.append(type(next(iter(read_state_file({str(tmp_path / "ckpt.pdparams")!r}).values()))).__name__)
    found.append(type(next(iter(storage.load_snapshot({str(tmp_path / "snap")!r}, "v").state_dict.values()))).__name__)
for _ in range(2):  # the first thread imports paddle; the second is the one that used to get DenseTensor
    t = threading.Thread(target=read); t.start(); t.join()
print(found)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == str(["Tensor"] * 4), out.stdout + out.stderr
