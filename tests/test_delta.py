"""Delta versions: only the changed elements are written and read, and every load comes out bit-exact.

Every expected tensor is the numpy array the test built; every expected digest comes from another path (the full
version of the same step, loaded the ordinary way).
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import BUCKET

import storage
from harness.launch import baton_serve
from infer.config import get_config
from infer.model import random_state_dict
from storage import deltacodec, layout

CONFIG = get_config("tiny")


def nudged(state: dict, seed: int, fraction: float = 0.02) -> dict:
    """``state`` with ``fraction`` of each float tensor's elements moved by one unit in the last place and a few
    integers changed: what a low-learning-rate step does to bf16 weights."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in state.items():
        a = a.copy()
        flat = a.reshape(-1)
        pick = rng.random(flat.size) < fraction
        pick[rng.integers(flat.size)] = True  # at least one element of every tensor
        if a.dtype.kind == "f":
            flat[pick] = np.nextafter(flat[pick], np.inf, dtype=a.dtype)
        elif a.dtype == np.bool_:
            flat[pick] = ~flat[pick]
        else:
            flat[pick] += 1
        out[name] = a
    return out


def every_dtype(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((96, 64)).astype(np.float32),
        "bf16": rng.integers(0, 1 << 16, (128, 40), dtype=np.uint16),  # published as raw bf16 bits below
        "f16": rng.standard_normal((33, 7)).astype(np.float16),
        "f64": rng.standard_normal((50,)),
        "i64": rng.integers(-5, 5, (17, 3)),
        "i32": rng.integers(-5, 5, (64,), dtype=np.int32),
        "u8": rng.integers(0, 255, (300,), dtype=np.uint8),
        "bool": rng.random((41,)) < 0.5,
        "nan": np.array([np.nan, -0.0, 0.0, np.inf], np.float32),
    }


def as_published(state: dict) -> dict:
    """The bf16 entry as a ``TensorRef`` of BF16 bits (numpy has no bfloat16)."""
    out = dict(state)
    bits = state["bf16"]
    out["bf16"] = storage.TensorRef("BF16", bits.shape, lambda: bits)
    return out


def host_targets(state: dict) -> dict:
    """Writable copies; the bf16 entry as a Paddle bfloat16 tensor holding those bits."""
    import paddle

    out = {n: a.copy() for n, a in state.items()}
    if "bf16" in out:
        out["bf16"] = paddle.to_tensor(out["bf16"]).view(paddle.bfloat16)
    return out


def same_bytes(target: dict, expected: dict) -> None:
    import paddle

    for name, a in expected.items():
        got = target[name]
        if not isinstance(got, np.ndarray):
            got = (got.view(paddle.uint16) if got.dtype == paddle.bfloat16 else got).numpy()
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(a).tobytes(), name


def files(root: str) -> list[str]:
    fs, path = storage.open_fs(root)
    return sorted(storage.listing(fs, path))


def test_every_dtype_round_trips_bit_exact_through_a_delta(root):
    v0 = every_dtype(0)
    v1 = nudged(v0, 1)
    v1["nan"] = np.array([np.nan, 0.0, -0.0, -np.inf], np.float32)  # sign bits and NaN payloads, not values
    storage.publish(as_published(v0), root, "v0")
    report = storage.publish(as_published(v1), root, "v1", base="v0")
    assert report.kind == "delta" and report.base == "v0"
    assert report.bytes < report.full_bytes / 2
    assert not any(layout.part_regex(0, "v1").fullmatch(f) for f in files(root))
    target = host_targets(v0)
    loaded = storage.load_snapshot(root, "v1", into=target)
    assert loaded.path == "delta" and loaded.bytes == report.bytes  # only the delta's files were read
    same_bytes(target, v1)
    fresh = host_targets({n: np.zeros_like(a) for n, a in v0.items()})
    assert storage.load_snapshot(root, "v1", into=fresh).path == "chain of 1 deltas from v0"
    same_bytes(fresh, v1)


def test_a_delta_with_nothing_changed_is_a_valid_empty_version(tmp_path):
    v0 = every_dtype(3)
    storage.publish(as_published(v0), str(tmp_path), "a")
    report = storage.publish(as_published(v0), str(tmp_path), "b", base="a")
    assert report.kind == "delta" and report.parts == 1
    target = host_targets(v0)
    assert storage.load_snapshot(str(tmp_path), "b", into=target).path == "delta"
    same_bytes(target, v0)


def test_the_trainer_cache_needs_no_read_of_the_base(tmp_path):
    """With ``LastPublished`` the base is compared in memory: the publish works with the base's parts gone."""
    root = str(tmp_path)
    cache = storage.LastPublished()
    v0 = every_dtype(4)
    storage.publish(as_published(v0), root, "v0", cache=cache)
    (tmp_path / "model_state.tp0.v0.part0.pdparams").unlink()
    v1 = nudged(v0, 5)
    report = storage.publish(as_published(v1), root, "v1", base="v0", cache=cache)
    assert report.kind == "delta" and cache.version() == "v1"
    v2 = nudged(v1, 6)
    # without the cache the base (v1 -> v0) must be read: v0 is torn, so v2 goes out in full
    report = storage.publish(as_published(v2), root, "v2", base="v1")
    assert report.kind == "full" and "base v1 cannot be read" in report.note and "v0.part0" in report.note
    target = host_targets(v1)
    storage.publish(as_published(v2), root, "v2b", base="v1", cache=cache)
    storage.load_snapshot(root, "v2b", into=target)
    same_bytes(target, v2)


def test_a_chain_then_a_full_version_and_prune_keeps_every_base(tmp_path):
    root = str(tmp_path)
    states = [random_state_dict(CONFIG, 0)]
    for i in range(1, 6):
        states.append(nudged(states[-1], i))
    kinds = [storage.publish(states[0], root, "s0", max_chain=3).kind]
    for i in range(1, 6):
        kinds.append(storage.publish(states[i], root, f"s{i}", base=f"s{i - 1}", max_chain=3).kind)
    assert kinds == ["full", "delta", "delta", "full", "delta", "delta"]
    by_name = {v.version: v.base for v in storage.list_versions(root)}
    assert by_name == {"s0": None, "s1": "s0", "s2": "s1", "s3": None, "s4": "s3", "s5": "s4"}
    # keep only the newest: its chain (s4, s3) stays, everything before the full s3 goes
    assert storage.prune(root, keep_last=1) == ["s0", "s1", "s2"]
    fresh = host_targets({n: np.zeros_like(a) for n, a in states[0].items()})
    assert storage.load_snapshot(root, "s5", into=fresh).path == "chain of 2 deltas from s3"
    same_bytes(fresh, states[5])


def test_a_large_change_is_published_in_full(tmp_path):
    v0 = random_state_dict(CONFIG, 0)
    v1 = random_state_dict(CONFIG, 1)  # every element differs
    storage.publish(v0, str(tmp_path), "a")
    report = storage.publish(v1, str(tmp_path), "b", base="a")
    assert report.kind == "full" and "50%" in report.note
    assert not [f for f in files(str(tmp_path)) if ".delta" in f]
    renamed = {**v1, "extra": np.zeros(3, np.float32)}
    report = storage.publish(renamed, str(tmp_path), "c", base="b")
    assert report.kind == "full" and "extra" in report.note


def test_a_pruned_base_is_named_in_the_error(tmp_path):
    root = str(tmp_path)
    v0 = random_state_dict(CONFIG, 0)
    storage.publish(v0, root, "base-7")
    storage.publish(nudged(v0, 1), root, "step-8", base="base-7")
    for f in tmp_path.glob("model_state.tp0.base-7.*"):
        f.unlink()
    with pytest.raises(storage.SnapshotNotFoundError, match=r"delta on 'base-7'.*pruned"):
        storage.load_snapshot(root, "step-8", into=host_targets({n: np.zeros_like(a) for n, a in v0.items()}))
    # a target that holds the base needs nothing else
    target = host_targets(v0)
    assert storage.load_snapshot(root, "step-8", into=target).path == "delta"


def damage_the_chain(tmp_path: Path, how: str) -> str:
    """Publishes a (full) <- b <- c (deltas) and damages the chain of c as ``how`` says; returns what the note
    must name."""
    if how == "pruned":
        for f in tmp_path.glob("model_state.tp0.c.*"):
            f.unlink()
        return "No snapshot found for model_state.tp0.c"
    if how == "manifest missing":
        (tmp_path / layout.manifest_name(0, "b")).unlink()
        return "a delta on 'b', which is not under"
    if how == "byte flipped in an older delta":
        path = delta_file(tmp_path, "b")
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        path.write_bytes(bytes(raw))
        return f"{layout.delta_name(0, 'b', 0)}: xxh3_128"
    if how == "base republished":
        storage.publish(random_state_dict(CONFIG, 9), str(tmp_path), "a", overwrite=True)
        return "is not the base b was published on"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["pruned", "manifest missing", "byte flipped in an older delta", "base republished"])
def test_a_base_that_cannot_be_read_gives_a_full_version_that_says_why(tmp_path, how):
    root = str(tmp_path)
    states = [random_state_dict(CONFIG, 0)]
    for i in (1, 2, 3):
        states.append(nudged(states[-1], i))
    storage.publish(states[0], root, "a")
    storage.publish(states[1], root, "b", base="a")
    storage.publish(states[2], root, "c", base="b")
    reason = damage_the_chain(tmp_path, how)
    report = storage.publish(states[3], root, "d", base="c")
    assert report.kind == "full" and report.base is None
    assert report.note.startswith("base c cannot be read (") and reason in report.note, report.note
    assert not [f for f in files(root) if layout.delta_regex(0, "d").fullmatch(f)]
    fresh = host_targets({n: np.zeros_like(a) for n, a in states[0].items()})
    assert storage.load_snapshot(root, "d", into=fresh).path == "full"
    same_bytes(fresh, states[3])


def test_a_base_that_fails_half_way_leaves_no_delta_file_behind(tmp_path, monkeypatch):
    """The base's chain resolves, but a tensor of it cannot be read after some of the delta is written."""
    root = str(tmp_path)
    v0 = random_state_dict(CONFIG, 0)
    storage.publish(v0, root, "a")
    v1 = nudged(v0, 1)
    reads = []
    real = storage.deltaload.RankReader.raw

    def fails_late(self, name):
        reads.append(name)
        if len(reads) > len(v0) // 2:
            raise FileNotFoundError(f"{root}/model_state.tp0.a.part0.pdparams")
        return real(self, name)

    monkeypatch.setattr(storage.deltaload.RankReader, "raw", fails_late)
    report = storage.publish(v1, root, "b", base="a", part_bytes=4096)  # small files: some written before it fails
    assert report.kind == "full" and "base a cannot be read" in report.note and "part0" in report.note
    assert not [f for f in files(root) if layout.delta_regex(0, "b").fullmatch(f)]
    monkeypatch.undo()
    fresh = host_targets({n: np.zeros_like(a) for n, a in v0.items()})
    storage.load_snapshot(root, "b", into=fresh)
    same_bytes(fresh, v1)


@pytest.mark.parametrize("base_readable", [True, False])
def test_a_target_that_cannot_be_written_still_fails_the_publish(tmp_path, monkeypatch, base_readable):
    root = str(tmp_path)
    v0 = random_state_dict(CONFIG, 0)
    storage.publish(v0, root, "a")
    if not base_readable:
        (tmp_path / layout.manifest_name(0, "a")).unlink()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.writer, "_write_local", disk_full)
    with pytest.raises(OSError, match="No space left"):
        storage.publish(nudged(v0, 1), root, "b", base="a")


def test_a_republished_base_is_not_taken_for_the_one_the_delta_was_built_on(tmp_path):
    root = str(tmp_path)
    v0 = random_state_dict(CONFIG, 0)
    storage.publish(v0, root, "a")
    storage.publish(nudged(v0, 1), root, "b", base="a")
    storage.publish(random_state_dict(CONFIG, 9), root, "a", overwrite=True)
    with pytest.raises(storage.TornSnapshotError, match="not the base b was published on"):
        storage.load_snapshot(root, "b")


def test_a_target_that_does_not_hold_the_base_is_never_patched(tmp_path):
    """A target one element away from the base takes the chain, not the delta: the digest decides."""
    root = str(tmp_path)
    v0 = random_state_dict(CONFIG, 0)
    v1 = nudged(v0, 1)
    storage.publish(v0, root, "a")
    storage.publish(v1, root, "b", base="a")
    almost = host_targets(v0)
    almost["model.norm.weight"][0] = 2.0
    assert storage.load_snapshot(root, "b", into=almost).path == "chain of 1 deltas from a"
    same_bytes(almost, v1)


def delta_file(root: Path, version: str, index: int = 0) -> Path:
    return root / layout.delta_name(0, version, index)


@pytest.mark.parametrize("verify", ["full", "stream", "none"])
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_corrupt_or_truncated_delta_is_refused_before_it_touches_the_target(tmp_path, verify, damage):
    root = str(tmp_path)
    v0 = random_state_dict(CONFIG, 0)
    storage.publish(v0, root, "a")
    storage.publish(nudged(v0, 1), root, "b", base="a")
    path = delta_file(tmp_path, "b")
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-20] ^= 0x55
    else:
        raw = raw[:-20]
    path.write_bytes(bytes(raw))
    target = host_targets(v0)
    with pytest.raises((storage.TornSnapshotError, storage.PartialApplyError)) as err:
        storage.load_snapshot(root, "b", into=target, verify=verify)
    assert "delta0" in str(err.value)
    if verify != "none":  # a delta file is read whole and checked before any of it is applied
        assert isinstance(err.value, storage.TornSnapshotError)
        same_bytes(target, v0)


def test_forged_frames_cannot_write_outside_the_tensor_or_inflate():
    import zstandard

    target = np.zeros(1000, np.uint8)
    width = 4
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    with pytest.raises(deltacodec.DeltaFormatError, match="declaring"):
        deltacodec.apply(target, np.array([len(bomb)], "<u8").tobytes() + bomb, width)
    k = 1
    plane = np.zeros(4 + (4 + width) * k, np.uint8)
    plane[:4] = np.array([k], "<u4").view(np.uint8)
    plane[4:8] = np.array([10_000], "<u4").view(np.uint8)  # a gap that jumps past the tensor
    frame = zstandard.ZstdCompressor().compress(plane.tobytes())
    with pytest.raises(deltacodec.DeltaFormatError, match="outside"):
        deltacodec.apply(target, np.array([len(frame)], "<u8").tobytes() + frame, width)
    assert not target.any()
    with pytest.raises(deltacodec.DeltaFormatError, match="outside"):
        deltacodec.changes(np.array([len(frame)], "<u8").tobytes() + frame, target.size // width, width)
    with pytest.raises(deltacodec.DeltaFormatError, match="shorter"):
        deltacodec.apply(target, b"\1", width)
    with pytest.raises(deltacodec.DeltaFormatError, match="declaring"):
        deltacodec.changes(np.array([len(bomb)], "<u8").tobytes() + bomb, target.size // width, width)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_a_deltas_changes_decode_to_the_changed_elements_and_their_xors(dtype, monkeypatch):
    """What a device applies (indices and XOR words) is what changed, read off the two states with numpy; over
    several windows, the last one short."""
    monkeypatch.setattr(deltacodec, "WINDOW", 1000)
    rng = np.random.default_rng(3)
    base = rng.integers(0, np.iinfo(dtype).max, 3500, dtype=dtype)
    new = base.copy()
    new[rng.random(base.size) < 0.05] ^= dtype(1)
    new[[0, 999, 1000, 3499]] += dtype(7)
    blob = deltacodec.encode(base.view(np.uint8), new.view(np.uint8), base.itemsize)
    index, xors = deltacodec.changes(blob, base.size, base.itemsize)
    want = np.flatnonzero(base != new)
    assert np.array_equal(index, want) and index.dtype == np.int64
    assert np.array_equal(xors, (base[want] ^ new[want]).astype(np.uint64))


def test_delta_files_are_not_parts_to_fastdeploy(tmp_path):
    """FastDeploy globs ``model_state.tp{R}.{G}.part*.pdparams`` (``fastdeploy/rl/dynamic_weight_manager.py``)."""
    v0 = random_state_dict(CONFIG, 0)
    storage.publish(v0, str(tmp_path), "7")
    storage.publish(nudged(v0, 1), str(tmp_path), "8", base="7")
    assert glob.glob(str(tmp_path / "model_state.tp0.8.part*.pdparams")) == []
    assert not (tmp_path / "model_state.tp0.8.pdparams").exists()
    assert not (tmp_path / "model_state.tp08.pdparams").exists()
    assert glob.glob(str(tmp_path / "model_state.tp0.8.delta*"))


def test_delta_on_s3_reads_only_the_delta(s3_endpoint, s3_fetched):
    root = f"s3://{BUCKET}/delta"
    v0 = random_state_dict(get_config("small"), 0)
    v1 = nudged(v0, 1, fraction=0.01)
    storage.publish(v0, root, "a", part_bytes=4 << 20)
    report = storage.publish(v1, root, "b", base="a", part_bytes=4 << 20)
    assert report.kind == "delta" and report.bytes < report.full_bytes * 0.15
    fs = storage.open_fs(root)[0]
    # the delta's manifest, and its base's, whose sum64 proves the target holds the base
    manifest = sum(len(fs.cat_file(f"{BUCKET}/delta/model_state.tp0.{v}.manifest.json")) for v in "ab")
    fetched = s3_fetched
    fetched.start()
    target = host_targets(v0)
    assert storage.load_snapshot(root, "b", into=target).path == "delta"
    same_bytes(target, v1)
    assert sum(fetched) - manifest <= report.bytes + report.parts * (64 << 10)  # the files and their header probes
    assert sum(fetched) < report.full_bytes * 0.15


def test_tp2_deltas_per_rank(tmp_path):
    root = str(tmp_path)
    v0 = random_state_dict(CONFIG, 0)
    v1 = nudged(v0, 1)
    for rank, (s0, s1) in enumerate(zip(storage.split_state_dict(v0, 2), storage.split_state_dict(v1, 2))):
        storage.publish(s0, root, "a", rank)
        assert storage.publish(s1, root, "b", rank, base="a").kind == "delta"
    for rank, (s0, s1) in enumerate(zip(storage.split_state_dict(v0, 2), storage.split_state_dict(v1, 2))):
        target = host_targets(s0)
        assert storage.load_snapshot(root, "b", rank, into=target).path == "delta"
        same_bytes(target, s1)
    from storage.whole import open_version

    whole = open_version(root, "b")
    for name, a in v1.items():
        assert whole.tensor(0, name).tobytes() == a.tobytes(), name


@pytest.mark.parametrize("version", ["a", "b"])
def test_a_part_truncated_after_it_was_opened_is_a_torn_snapshot_not_a_crash(tmp_path, version):
    """Exports and chains read a version's files whole, never mapped: a file cut short after the version was opened
    (resolved, sizes and headers checked) is a ``TornSnapshotError`` naming it, never a SIGBUS."""
    from storage.whole import open_version

    root = str(tmp_path)
    v0 = random_state_dict(CONFIG, 0)
    storage.publish(v0, root, "a")
    storage.publish(nudged(v0, 1), root, "b", base="a")
    whole = open_version(root, version)
    part = tmp_path / layout.part_name(0, "a", 0)
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(storage.TornSnapshotError, match=part.name):
        for name in v0:
            whole.tensor(0, name)


def test_fastdeploy_and_sglang_get_the_delta_materialised(tmp_path):
    """Staging a delta version writes exactly what staging the same state published in full writes."""
    from storage.hfexport import export_hf_dir

    doc = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": CONFIG.hidden,
           "num_hidden_layers": CONFIG.layers, "num_attention_heads": CONFIG.heads,
           "num_key_value_heads": CONFIG.kv_heads, "intermediate_size": CONFIG.intermediate,
           "vocab_size": CONFIG.vocab_size, "max_position_embeddings": CONFIG.max_seq_len, "rms_norm_eps": 1e-6,
           "torch_dtype": "float32", "tie_word_embeddings": False}
    from infer.hf import config_from_hf

    root = str(tmp_path / "snap")
    v0 = random_state_dict(config_from_hf(doc), 0)  # Qwen2: with q/k/v biases
    v1 = nudged(v0, 1)
    storage.publish(v0, root, "a")
    storage.publish(v1, root, "b", base="a")
    storage.publish(v1, root, "b-full")
    config = json.dumps(doc).encode()
    delta_dir = Path(export_hf_dir(root, "b", str(tmp_path / "exp"), config))
    full_dir = Path(export_hf_dir(root, "b-full", str(tmp_path / "exp"), config))
    shards = sorted(p.name for p in full_dir.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in delta_dir.glob("*.safetensors"))
    for name in shards:
        assert (delta_dir / name).read_bytes() == (full_dir / name).read_bytes(), name
    from safetensors.numpy import load_file

    from storage.fastdeploy import export_fastdeploy

    staged = {}
    for version in ("b", "b-full"):  # FastDeploy's inference layout, two workers
        model_dir = tmp_path / f"fd-{version}"
        model_dir.mkdir()
        (model_dir / "config.json").write_bytes(config)
        export_fastdeploy(root, version, str(model_dir), [0, 1])
        staged[version] = {(p.name, n): a.tobytes() for p in sorted(model_dir.glob("*.pdparams"))
                           for n, a in load_file(str(p)).items()}  # the headers name the version: tensors compared
    assert staged["b"] and staged["b"] == staged["b-full"]


def digest(url: str) -> str:
    return httpx.get(f"{url}/v1/weights", timeout=30).json()["digest"]


def update(url: str, version: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/update_weights", json={"version": version, **body}, timeout=120)


def test_server_takes_deltas_catches_up_through_the_chain_and_matches_full_versions(tmp_path):
    root = str(tmp_path)
    states = [random_state_dict(CONFIG, 0)]
    for i in range(1, 5):
        states.append(nudged(states[-1], i))
    cache = storage.LastPublished()
    storage.publish(states[0], root, "d0", cache=cache)
    for i in range(1, 5):
        assert storage.publish(states[i], root, f"d{i}", base=f"d{i - 1}", cache=cache).kind == "delta"
        storage.publish(states[i], root, f"f{i}")  # the same step in full: the digest each delta must reach
    with baton_serve(root, "--version", "d0") as url, baton_serve(root, "--version", "d0") as other:
        for i in (1, 2):
            reply = update(url, f"d{i}").json()
            assert reply["success"] and reply["load_path"] == "delta", reply
            assert update(other, f"f{i}").json()["load_path"] == "full"
            assert digest(url) == digest(other)
        # the other server missed d3: from f2 (the same bytes as d2, so the same digest) d3 is a delta again
        assert update(other, "d3").json()["load_path"] == "delta"
        # a server that missed versions catches up through the chain from the full d0
        with baton_serve(root, "--version", "d0") as late:
            reply = update(late, "d4").json()
            assert reply["load_path"] == "chain of 4 deltas from d0", reply
            assert update(url, "f4").json()["success"]
            assert digest(late) == digest(url)
            weights = httpx.get(f"{late}/v1/weights").json()
            assert weights["version"] == "d4" and weights["load_path"].startswith("chain")
        metrics = httpx.get(f"{url}/metrics").text
        assert re.search(r'baton_weight_update_paths_total\{path="delta"\} 2\.0', metrics), metrics


def bf16_of(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 bits by Paddle's own cast: what a bf16 server holds after loading them."""
    import paddle

    return paddle.to_tensor(a).astype(paddle.bfloat16).view(paddle.uint16).numpy()


def test_a_chain_into_targets_of_another_dtype_is_read_whole_then_cast(tmp_path):
    """A float32 chain loaded into bfloat16 targets (a server serving bf16 from float32 snapshots): a cast target
    never holds the snapshot's bits, so no delta may be XORed into it; each tensor is read at the version through the
    chain and then cast. The result is Paddle's cast of the version's float32 values, and a corrupt delta in the
    chain is still refused."""
    import paddle

    root = str(tmp_path)
    states = [random_state_dict(CONFIG, 0)]
    for i in (1, 2):
        states.append(nudged(states[-1], i))
    storage.publish(states[0], root, "a")
    storage.publish(states[1], root, "b", base="a")
    storage.publish(states[2], root, "c", base="b")
    targets = {n: paddle.zeros(a.shape, paddle.bfloat16) for n, a in states[0].items()}
    report = storage.load_snapshot(root, "c", into=targets, cast=True)
    assert report.path == "chain of 2 deltas from a"
    for name, a in states[2].items():
        assert np.array_equal(targets[name].view(paddle.uint16).numpy(), bf16_of(a)), name
    path = delta_file(tmp_path, "c")
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0x55
    path.write_bytes(bytes(raw))
    with pytest.raises(storage.TornSnapshotError, match="delta0"):
        storage.load_snapshot(root, "c", into=targets, cast=True)


def test_a_bf16_server_takes_float32_deltas_through_the_chain(tmp_path):
    """``baton serve --dtype bfloat16`` over float32 snapshots: every delta version loads (through its chain, cast at
    the end) to the same weights as the full version of the same step."""
    root = str(tmp_path)
    states = [random_state_dict(CONFIG, 0)]
    for i in (1, 2):
        states.append(nudged(states[-1], i))
    storage.publish(states[0], root, "d0")
    for i in (1, 2):
        storage.publish(states[i], root, f"d{i}", base=f"d{i - 1}")
        storage.publish(states[i], root, f"f{i}")
    with baton_serve(root, "--version", "d0", "--dtype", "bfloat16") as url, \
            baton_serve(root, "--version", "d0", "--dtype", "bfloat16") as other:
        for i in (1, 2):
            reply = update(url, f"d{i}").json()
            assert reply["success"] and reply["load_path"] == f"chain of {i} deltas from d0", reply
            assert update(other, f"f{i}").json()["load_path"] == "full"
            assert digest(url) == digest(other)


@pytest.mark.parametrize("verify", ["stream", "none"])
def test_server_refuses_a_corrupt_delta_and_keeps_serving(tmp_path, verify):
    root = str(tmp_path)
    v0 = random_state_dict(CONFIG, 0)
    storage.publish(v0, root, "a")
    storage.publish(nudged(v0, 1), root, "b", base="a", part_bytes=1_000)
    assert len(list(tmp_path.glob("model_state.tp0.b.delta*"))) > 2
    path = delta_file(tmp_path, "b", 2)  # a later file: under "none" the earlier ones are applied first
    raw = bytearray(path.read_bytes())
    raw[-10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with baton_serve(root, "--version", "a") as url:
        before = digest(url)
        reply = update(url, "b", verify=verify)
        assert reply.status_code == 400 and "delta2" in reply.json()["message"], reply.text
        assert digest(url) == before
        assert httpx.get(f"{url}/v1/weights").json()["version"] == "a"


def test_double_buffer_starts_the_spare_from_the_live_copy(tmp_path):
    root = str(tmp_path)
    states = [random_state_dict(CONFIG, 0)]
    for i in range(1, 4):
        states.append(nudged(states[-1], i))
        storage.publish(states[-1], root, f"f{i}")
    storage.publish(states[0], root, "d0")
    for i in range(1, 4):
        storage.publish(states[i], root, f"d{i}", base=f"d{i - 1}")
    with baton_serve(root, "--version", "d0", "--swap", "double_buffer") as url, \
            baton_serve(root, "--version", "f3") as full:
        for i in range(1, 4):
            reply = update(url, f"d{i}").json()
            assert reply["load_path"] == "delta" and reply["bytes"] < 0.2 * 4 * CONFIG.num_parameters(), reply
        assert digest(url) == digest(full)


def test_the_apply_loop_prefetches_the_lines_it_will_change():
    """The apply is bound by memory, not by decoding: its compiled loop must ask for each change's line ahead
    (x86 ``prefetchw``, arm ``prfm``), or a llvmlite that renames the intrinsic would silently drop it."""
    import numba

    fresh = numba.njit(nogil=True)(deltacodec._apply.py_func)  # the cached build keeps no assembly to read
    target = np.zeros(100, np.uint16)
    frame = np.array([1, 0, 0, 0x80, 1, 0, 0, 0, 3, 5], np.uint8)  # one change: gap 3 (element 3), XOR 5
    fresh(target, 0, 100, frame, 1, 2, True, np.uint64(3), np.uint64(5))
    asm = "\n".join(fresh.inspect_asm().values())
    assert re.search(r"\bprefetch\w*\b|\bprfm\b", asm), "no prefetch instruction in the compiled apply loop"
    assert target.tolist() == [0, 0, 0, 5] + [0] * 96


def leb128(value: int) -> list[int]:
    """Unsigned LEB128, written here apart from the codec: 7 bits a byte, low bits first, the top bit on all but the
    last byte."""
    out = []
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return out


def one_frame(content: bytes) -> bytes:
    """A one-window blob holding ``content`` as its zstd frame."""
    import zstandard

    frame = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(content)
    return np.array([len(frame)], "<u8").tobytes() + frame


def test_a_frame_is_the_count_then_the_gaps_then_the_xors_as_varints_as_format_md_says():
    import zstandard

    base = np.zeros(1000, np.uint16)
    new = base.copy()
    new[0], new[200], new[999] = 0x0001, 0x8001, 0x00FF  # gaps 0, 199, 798
    blob = deltacodec.encode(base.view(np.uint8), new.view(np.uint8), 2)
    gaps, xors = leb128(0) + leb128(199) + leb128(798), leb128(0x0001) + leb128(0x8001) + leb128(0xFF)
    assert gaps + xors == [0x00, 0xC7, 0x01, 0x9E, 0x06, 0x01, 0x81, 0x80, 0x02, 0xFF, 0x01]  # by hand
    want = bytes([3, 0, 0, 0x80, len(gaps), 0, 0, 0] + gaps + xors)
    assert int(np.frombuffer(blob, "<u8", 1)[0]) == len(blob) - 8
    assert zstandard.ZstdDecompressor().decompress(blob[8:]) == want


def frame(k: int, gaps: list[int], xors: list[int], g: int | None = None, count: int | None = None) -> bytes:
    """A frame's content: the head (``k`` with the varints bit, ``g`` the gaps' bytes), then the two streams."""
    head = np.array([(k if count is None else count) | 1 << 31, len(gaps) if g is None else g], "<u4")
    return head.tobytes() + bytes(gaps + xors)


@pytest.mark.parametrize(("content", "why"), [
    (frame(1, [0x80, 0x80], [1]), "does not decode"),  # a gap that runs past its stream
    (frame(1, [0], [0x81, 0x81]), "does not decode"),  # an XOR that runs past the frame
    (frame(1, [0x80] * 5 + [1], [1]), "does not decode"),  # a 6-byte gap
    (frame(1, [0], [0x80, 0x80, 0x04]), "does not decode"),  # an XOR of 2**16: wider than 2 bytes
    (frame(1, [0, 0], [1]), "does not decode"),  # a byte after the last gap
    (frame(1, [0], [1, 7]), "does not decode"),  # a byte after the last XOR
    (frame(2, [0, 0xE7, 0x07], [1, 1]), "outside"),  # the second change at element 1001 of 1000
    (frame(0, [], []), "0 changes"),
    (frame(1001, [0] * 1001, [1] * 1001), "1001 changes"),
    (frame(1, [0], []), "9 bytes for 1 changes"),
    (frame(2, [0, 0], [1, 1], g=3), "12 bytes for 2 changes"),  # the gaps' bytes leave one byte for two XORs
])
def test_forged_frames_are_refused_and_nothing_from_the_refused_change_on_is_written(content, why):
    """Each forged frame raises a ``DeltaFormatError`` from ``apply`` and ``changes``; nothing from the refused
    change on is written."""
    blob = one_frame(content)
    target = np.zeros(1000, np.uint16)
    with pytest.raises(deltacodec.DeltaFormatError, match=why):
        deltacodec.apply(target.view(np.uint8), blob, 2)
    assert not target[1:].any()
    with pytest.raises(deltacodec.DeltaFormatError, match=why):
        deltacodec.changes(blob, 1000, 2)


def test_an_eight_byte_xor_takes_ten_varint_bytes_and_no_bit_past_63():
    target = np.zeros(4, np.uint64)
    top = one_frame(frame(1, [2], [0xFF] * 9 + [0x01]))  # 2**64 - 1: all 64 bits
    deltacodec.apply(target.view(np.uint8), top, 8)
    assert target.tolist() == [0, 0, 2**64 - 1, 0]
    with pytest.raises(deltacodec.DeltaFormatError, match="does not decode"):  # bit 64 set: wider than the element
        deltacodec.apply(target.view(np.uint8), one_frame(frame(1, [2], [0xFF] * 9 + [0x03])), 8)
    assert target.tolist() == [0, 0, 2**64 - 1, 0]


def planes_blob(base: np.ndarray, new: np.ndarray, window: int) -> bytes:
    """A format_version 2 blob (the previous release's encoding) of two word arrays, built here from FORMAT.md: per
    window ``u32 k``, the u32 gaps as 4 byte planes, then the XORs as ``w`` byte planes, in one zstd frame."""
    import zstandard

    frames = []
    for lo in range(0, base.size, window):
        at = np.flatnonzero(base[lo:lo + window] != new[lo:lo + window])
        if not at.size:
            frames.append(b"")
            continue
        gaps = (np.diff(np.concatenate([[-1], at])) - 1).astype("<u4")
        xors = base[lo:lo + window][at] ^ new[lo:lo + window][at]
        raw = np.array([at.size], "<u4").tobytes() + gaps.view(np.uint8).reshape(-1, 4).T.tobytes() + \
            xors.view(np.uint8).reshape(-1, base.itemsize).T.tobytes()
        frames.append(zstandard.ZstdCompressor(level=1, write_checksum=True).compress(raw))
    return np.array([len(f) for f in frames], "<u8").tobytes() + b"".join(frames)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_format_version_2_planes_still_apply_and_decode(dtype, monkeypatch):
    """Deltas the previous release published (byte planes) apply bit-exact, with the same sum change, and decode to
    the same changes, over several windows."""
    monkeypatch.setattr(deltacodec, "WINDOW", 1000)
    rng = np.random.default_rng(5)
    base = rng.integers(0, np.iinfo(dtype).max, 3500, dtype=dtype)
    new = base.copy()
    new[rng.random(base.size) < 0.05] ^= rng.integers(1, np.iinfo(dtype).max, dtype=dtype)
    new[[0, 999, 1000, 3499]] ^= dtype(1)
    blob = planes_blob(base, new, 1000)
    target = base.copy()
    change = deltacodec.apply(target.view(np.uint8), blob, base.itemsize, weigh=True)
    assert np.array_equal(target, new)
    want = np.flatnonzero(base != new)
    xors = (base[want] ^ new[want]).astype(np.uint64)
    assert change == deltacodec.weighed_change(want, base[want], xors, base.itemsize)
    index, got = deltacodec.changes(blob, base.size, base.itemsize)
    assert np.array_equal(index, want) and np.array_equal(got, xors)


def test_a_version_2_delta_published_by_the_previous_release_loads_into_its_base(tmp_path, monkeypatch):
    """A snapshot root the previous release wrote (delta manifests of format_version 2, planes in their files) is
    read by this one: a server upgraded mid-chain applies those deltas, bit-exact, to the version's digest."""
    root = str(tmp_path)
    v0 = random_state_dict(CONFIG, 0)
    v1, v2 = nudged(v0, 1), nudged(nudged(v0, 1), 2)
    words = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

    def planes(base, new, width, update=False):
        if np.array_equal(base, new):
            return None
        blob = planes_blob(base.view(words[width]), new.view(words[width]), deltacodec.WINDOW)
        if update:
            np.copyto(base, new)
        return blob

    storage.publish(v0, root, "a")
    with monkeypatch.context() as old:
        old.setattr(deltacodec, "encode", planes)
        old.setattr(storage.manifest, "FORMAT_VERSION", 2)
        storage.publish(v1, root, "b", base="a")
    storage.publish(v2, root, "c", base="b")  # this release's delta on the old one
    versions = {v: json.loads((tmp_path / layout.manifest_name(0, v)).read_bytes())["format_version"] for v in "bc"}
    assert versions == {"b": 2, "c": 3}
    assert frames_of_first_delta(tmp_path, "b")[3] < 0x80  # the count's top bit clear: planes
    assert frames_of_first_delta(tmp_path, "c")[3] >= 0x80  # set: varints
    target = host_targets(v0)
    assert storage.load_snapshot(root, "b", into=target).path == "delta"
    same_bytes(target, v1)
    assert storage.load_snapshot(root, "c", into=target).path == "delta"
    same_bytes(target, v2)
    fresh = host_targets(random_state_dict(CONFIG, 9))
    assert storage.load_snapshot(root, "c", into=fresh).path == "chain of 2 deltas from a"
    same_bytes(fresh, v2)


def frames_of_first_delta(root: Path, version: str) -> bytes:
    """The first non-empty frame of the first tensor in ``version``'s first delta file, inflated."""
    import zstandard

    raw = delta_file(root, version).read_bytes()
    size = int(np.frombuffer(raw, "<u8", 1)[0])
    header = json.loads(raw[8:8 + size])
    name = next(n for n in header if n != "__metadata__")
    start, end = header[name]["data_offsets"]
    blob = raw[8 + size + start:8 + size + end]
    windows = 1  # the test's tensors are all under one window
    length = int(np.frombuffer(blob, "<u8", 1)[0])
    return zstandard.ZstdDecompressor().decompress(blob[8 * windows:8 * windows + length])
