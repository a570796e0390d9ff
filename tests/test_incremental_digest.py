"""The sum64 digest a delta advances from its changed elements alone: after every delta of a trajectory it equals
the digest computed over the whole model, a target that does not hold the base is refused and put back, a corrupt
delta is refused (or partial and put back) under every ``verify``, and a server proves a delta without hashing its
model.

Expected values come from elsewhere: each tensor's sum64 from the formula written out in numpy's wrapping uint64
arithmetic, the state digests from ``storage.digest`` over the whole target and from the manifests.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_delta import as_published, delta_file, host_targets, same_bytes

import storage
from infer import digest as server_digest
from infer import weights as weights_module
from infer.config import get_config
from infer.model import random_state_dict
from storage import deltacodec, deltaload, layout
from storage import digest as storage_digest
from storage.digest import ADD, MUL, state_digest, sum64_digest

CONFIG = get_config("tiny")
WORDS = {1: np.uint8, 2: np.uint16}  # sum64 reads 1- and 2-byte elements as such, wider ones as 32-bit words


def numpy_sum64(a: np.ndarray) -> int:
    """The formula of ``storage/FORMAT.md`` in numpy, not the compiled loop under test."""
    raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    words = raw.view(WORDS.get(a.dtype.itemsize, np.uint32)).astype(np.uint64)
    i = np.arange(words.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return int((words * (i * np.uint64(MUL) + np.uint64(ADD))).sum(dtype=np.uint64))


def codes(state: dict) -> dict:
    return {n: ("BF16" if n == "bf16" else storage.code_of_numpy(a.dtype), a.shape) for n, a in state.items()}


def expected_sum64_digest(state: dict) -> str:
    return sum64_digest({n: (code, shape, numpy_sum64(state[n])) for n, (code, shape) in codes(state).items()})


def step(state: dict, seed: int) -> dict:
    """One optimizer-like step in raw bits: ~2% of each tensor's elements take a new low bit, and the special
    tensor's NaN payloads and zero signs change."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, a in state.items():
        a = a.copy()
        words = a.reshape(-1).view(WORDS.get(a.dtype.itemsize, np.uint32 if a.dtype.itemsize == 4 else np.uint64))
        pick = rng.random(words.size) < 0.02
        pick[rng.integers(words.size)] = True
        words[pick] ^= words.dtype.type(1 << int(rng.integers(0, 3)))
        out[name] = a
    if "special" not in out:
        return out
    special = out["special"].view(np.uint32)
    special[0] = 0x7FC00000 | int(rng.integers(1, 1 << 22))  # a quiet NaN with another payload
    special[1] ^= 0x80000000  # -0.0 <-> 0.0
    special[2] = 0xFF800000 | int(rng.integers(1, 1 << 22))  # a negative signalling-style NaN
    return out


def start_state() -> dict:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((96, 64)).astype(np.float32),
        "bf16": rng.integers(0, 1 << 16, (128, 40), dtype=np.uint16),  # bf16 bits, published as BF16
        "f16": rng.standard_normal((33, 7)).astype(np.float16),
        "i64": rng.integers(-5, 5, (17, 3)),
        "i32": rng.integers(-5, 5, (64,), dtype=np.int32),
        "u8": rng.integers(0, 255, (300,), dtype=np.uint8),
        "special": np.array([np.nan, -0.0, np.nan, 0.0, np.inf], np.float32),
    }


def test_the_incremental_sum64_equals_the_whole_models_after_every_delta(tmp_path):
    root = str(tmp_path)
    states = [start_state()]
    storage.publish(as_published(states[0]), root, "v0")
    target = host_targets(states[0])
    sums = storage.load_snapshot(root, "v0", into=target, held_sums={}).sums
    for k in range(1, 7):
        states.append(step(states[-1], k))
        assert storage.publish(as_published(states[-1]), root, f"v{k}", base=f"v{k - 1}").kind == "delta"
        report = storage.load_snapshot(root, f"v{k}", into=target, held_sums=sums)  # no base digest passed
        assert report.path == "delta"
        sums = report.sums
        manifest = storage.resolve(root, f"v{k}").manifest
        assert sums == {n: numpy_sum64(a) for n, a in states[-1].items()}, k
        assert sum64_digest({n: (c, s, sums[n]) for n, (c, s) in codes(states[-1]).items()}) == \
            expected_sum64_digest(states[-1]) == manifest.sum64
        assert state_digest(target, storage.resolve(root, f"v{k}").index()) == manifest.digest
        same_bytes(target, states[-1])


def test_tp2_shard_views_advance_each_ranks_sums(tmp_path):
    """Each rank's process holds its shard; here as views of a model-sized buffer per rank (column-split views are
    strided: applied through a copy written back)."""
    root = str(tmp_path)
    states = [random_state_dict(CONFIG, 0)]
    for rank, shard in enumerate(storage.split_state_dict(states[0], 2)):
        storage.publish(shard, root, "v0", rank)
    buffers = [{n: a.copy() for n, a in states[0].items()} for _ in range(2)]
    views = [storage.shard_views(buffers[r], r, 2) for r in range(2)]
    sums = [storage.load_snapshot(root, "v0", r, into=views[r], held_sums={}).sums for r in range(2)]
    for k in range(1, 6):
        states.append(step(states[-1], k))
        for rank, shard in enumerate(storage.split_state_dict(states[-1], 2)):
            assert storage.publish(shard, root, f"v{k}", rank, base=f"v{k - 1}").kind == "delta"
        for r, shard in enumerate(storage.split_state_dict(states[-1], 2)):
            report = storage.load_snapshot(root, f"v{k}", r, into=views[r], held_sums=sums[r])
            assert report.path == "delta"
            sums[r] = report.sums
            assert sums[r] == {n: numpy_sum64(a) for n, a in shard.items()}
            assert storage.resolve(root, f"v{k}", r).manifest.sum64 == expected_sum64_digest(shard)
            same_bytes(views[r], shard)


def two_versions(root: str) -> tuple[dict, dict]:
    a = random_state_dict(CONFIG, 0)
    b = step(a, 1)
    storage.publish(a, root, "a")
    assert storage.publish(b, root, "b", base="a").kind == "delta"
    return a, b


def changed_position(a: dict, b: dict) -> tuple[str, int]:
    name = next(n for n in a if not np.array_equal(a[n], b[n]))
    return name, int(np.flatnonzero(a[name].reshape(-1) != b[name].reshape(-1))[0])


def test_a_target_that_differs_from_its_record_at_a_changed_position_is_refused(tmp_path):
    """The caller's record (base digest and sums) says the base; the target differs in the bits the delta changes
    (it already holds the new value there: a half-applied update)."""
    root = str(tmp_path)
    a, b = two_versions(root)
    target = host_targets(a)
    sums = storage.load_snapshot(root, "a", into=target, held_sums={}).sums
    name, at = changed_position(a, b)
    target[name].reshape(-1)[at] = b[name].reshape(-1)[at]  # changed outside Baton
    with pytest.raises(storage.PartialApplyError, match="sum64"):
        storage.load_snapshot(root, "b", into=target, held_sums=sums,
                              base_digest=storage.resolve(root, "a").manifest.digest)
    storage.load_snapshot(root, "a", into=target)  # what a caller does with a partial apply: put the base back
    same_bytes(target, a)


def test_a_target_holding_another_version_under_a_forged_record_is_refused(tmp_path):
    root = str(tmp_path)
    a, b = two_versions(root)
    other = step(a, 99)
    storage.publish(other, root, "x")
    target = host_targets(other)
    forged = storage.load_snapshot(root, "a", into=host_targets(a), held_sums={}).sums
    with pytest.raises(storage.PartialApplyError, match="sum64"):
        storage.load_snapshot(root, "b", into=target, held_sums=forged)


def forge_delta(tmp_path, a: dict) -> None:
    """Replaces b's delta file by one that decodes cleanly to another state, its checksum fixed in the manifest:
    only the state digest can tell."""
    forged_root = tmp_path / "forged"
    storage.publish(a, str(forged_root), "a")
    wrong = step(a, 7)
    storage.publish(wrong, str(forged_root), "b", base="a")
    good, bad = delta_file(tmp_path, "b"), delta_file(forged_root, "b")
    good.write_bytes(bad.read_bytes())
    path = tmp_path / layout.manifest_name(0, "b")
    doc = json.loads(path.read_bytes())
    forged_doc = json.loads((forged_root / layout.manifest_name(0, "b")).read_bytes())
    doc["parts"] = forged_doc["parts"]
    doc["tensors"] = {n: {**t, "part": forged_doc["tensors"][n]["part"]} for n, t in doc["tensors"].items()}
    path.write_text(json.dumps(doc, sort_keys=True))


@pytest.mark.parametrize("verify", ["none", "stream", "full"])
@pytest.mark.parametrize("damage", ["flip", "forged"])
def test_a_corrupt_delta_is_refused_with_held_sums_under_every_verify(tmp_path, verify, damage):
    root = str(tmp_path)
    a, b = two_versions(root)
    if damage == "flip":
        path = delta_file(tmp_path, "b")
        raw = bytearray(path.read_bytes())
        raw[-20] ^= 0x55
        path.write_bytes(bytes(raw))
    else:
        forge_delta(tmp_path, a)
    target = host_targets(a)
    sums = storage.load_snapshot(root, "a", into=target, held_sums={}).sums
    with pytest.raises((storage.TornSnapshotError, storage.PartialApplyError)) as err:
        storage.load_snapshot(root, "b", into=target, held_sums=sums, verify=verify)
    if isinstance(err.value, storage.PartialApplyError):
        assert err.value.applied  # honest: names what it wrote
        storage.load_snapshot(root, "a", into=target)
    same_bytes(target, a)


# ---- the server ---------------------------------------------------------------------------------------------


def manager(root: str, mode: str):
    return weights_module.WeightManager(CONFIG, root, mode=mode)


def live_bytes(m) -> dict:
    return {n: t.numpy() for n, t in m.live.model.state_dict().items()}


class Hashes:
    """Counts every whole-model hash: xxh3 state digests and sum64 over a whole tensor."""

    def __init__(self, monkeypatch, sizes: set[int]):
        self.calls = []
        for module in (storage_digest, deltaload, weights_module, server_digest):
            for name in ("state_digest", "snapshot_digest"):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, self._counted(getattr(module, name), name))
        for module in (storage_digest, server_digest):
            real = module.sum64

            def sum64(words, _real=real):
                if words.size in sizes:
                    self.calls.append(("sum64", words.size))
                return _real(words)

            monkeypatch.setattr(module, "sum64", sum64)

    def _counted(self, real, name):
        def counted(*args, **kwargs):
            self.calls.append((name,))
            return real(*args, **kwargs)
        return counted


@pytest.mark.parametrize("mode", ["in_place", "double_buffer"])
def test_a_server_proves_deltas_without_hashing_its_model(tmp_path, monkeypatch, mode):
    root = str(tmp_path)
    states = [random_state_dict(CONFIG, 0)]
    storage.publish(states[0], root, "v0")
    for k in range(1, 4):
        states.append(step(states[-1], k))
        storage.publish(states[-1], root, f"v{k}", base=f"v{k - 1}")
    m = manager(root, mode)
    m.update("v0")
    hashes = Hashes(monkeypatch, {a.size for a in states[0].values()})
    for k in range(1, 4):
        info = m.update(f"v{k}")
        assert info.path == "delta", info
        assert info.to_json()["digest"] == storage.resolve(root, f"v{k}").manifest.digest
    if mode == "in_place":  # back to the base: the same delta again, proven by the base's sums
        info = m.update("v2")
        assert info.path == "delta reversed" and info.digest == storage.resolve(root, "v2").manifest.digest
    assert hashes.calls == []
    monkeypatch.undo()
    assert server_digest.state_digest(m.live.model.state_dict()) == m.info.digest


@pytest.mark.parametrize("mode", ["in_place", "double_buffer"])
def test_a_server_whose_weights_changed_at_a_changed_position_refuses_the_delta_and_restores(tmp_path, mode):
    import paddle

    root = str(tmp_path)
    a, b = two_versions(root)
    m = manager(root, mode)
    m.update("a")
    name, at = changed_position(a, b)
    param = m.live.model.state_dict()[name]
    values = param.numpy().copy()
    values.reshape(-1)[at] = b[name].reshape(-1)[at]
    param.set_value(paddle.to_tensor(values))  # outside Baton: the record still says "a"
    with pytest.raises(weights_module.SnapshotRejected):
        m.update("b")
    assert m.info.version == "a"
    if mode == "in_place":  # the live copy was written, so it was put back from storage
        same_bytes(live_bytes(m), a)
        assert server_digest.state_digest(m.live.model.state_dict()) == m.info.digest
    else:  # the spare was written from the live copy and dropped; the live copy was only read
        assert m.spare is None


def test_verify_full_catches_a_change_the_delta_does_not_touch(tmp_path):
    """The O(changed) proof sees only the bits a delta changes; ``verify="full"`` proves the whole model."""
    import paddle

    root = str(tmp_path)
    a, b = two_versions(root)
    m = manager(root, "in_place")
    m.update("a")
    name, _ = changed_position(a, b)
    unchanged = int(np.flatnonzero(a[name].reshape(-1) == b[name].reshape(-1))[0])
    param = m.live.model.state_dict()[name]
    values = param.numpy().copy()
    values.reshape(-1)[unchanged] += 1.0
    param.set_value(paddle.to_tensor(values))
    with pytest.raises(weights_module.SnapshotRejected, match="restored"):
        m.update("b", verify="full")
    assert m.info.version == "a" and m.info.digest == storage.resolve(root, "a").manifest.digest
    same_bytes(live_bytes(m), a)


@pytest.mark.parametrize("verify", ["none", "stream", "full"])
def test_a_server_refuses_a_forged_delta_under_every_verify(tmp_path, verify):
    root = str(tmp_path)
    a, _ = two_versions(root)
    forge_delta(tmp_path, a)
    m = manager(root, "in_place")
    m.update("a")
    with pytest.raises(weights_module.SnapshotRejected):
        m.update("b", verify=verify)
    assert m.info.version == "a" and m.info.digest == storage.resolve(root, "a").manifest.digest
    same_bytes(live_bytes(m), a)


@pytest.mark.parametrize("verify", ["stream", "none"])
def test_a_library_load_knowing_nothing_proves_the_base_by_sums_and_hashes_nothing_whole(tmp_path, monkeypatch,
                                                                                          verify):
    """No base digest, no held sums: the target's sums (one pass) prove the base and the apply advances them, so
    the result is proven without the whole-model xxh3 pass a digest would take."""
    root = str(tmp_path)
    states = [start_state()]
    storage.publish(as_published(states[0]), root, "v0")
    target = host_targets(states[0])
    storage.load_snapshot(root, "v0", into=target)

    def no_whole_hash(*args, **kwargs):
        raise AssertionError("the whole model was hashed")

    monkeypatch.setattr(deltaload, "state_digest", no_whole_hash)
    for k in range(1, 4):
        states.append(step(states[-1], k))
        assert storage.publish(as_published(states[-1]), root, f"v{k}", base=f"v{k - 1}").kind == "delta"
        report = storage.load_snapshot(root, f"v{k}", into=target, verify=verify)
        assert report.path == "delta"
        assert report.sums == {n: numpy_sum64(a) for n, a in states[-1].items()}
        same_bytes(target, states[-1])


def test_a_library_load_knowing_nothing_still_refuses_a_target_one_word_off_the_base(tmp_path):
    root = str(tmp_path)
    a, b = two_versions(root)
    target = host_targets(a)
    name, at = changed_position(a, b)
    target[name].reshape(-1).view(np.uint8)[at * target[name].itemsize] ^= 1  # one bit off the base
    report = storage.load_snapshot(root, "b", into=target)
    assert report.path == "chain of 1 deltas from a"  # read from the full version, never patched
    same_bytes(target, b)


def test_one_corrupt_blob_among_a_files_tensors_is_named_and_stays_inside_its_tensor():
    import zstandard

    rng = np.random.default_rng(3)
    base = {n: rng.integers(0, 1 << 16, 5000, dtype=np.uint16) for n in ("a", "b", "c")}
    new = {n: v ^ (rng.random(v.size) < 0.05).astype(np.uint16) for n, v in base.items()}
    blobs = {n: deltacodec.encode(base[n].view(np.uint8), new[n].view(np.uint8), 2) for n in base}
    plane = np.zeros(4 + 6, np.uint8)
    plane[:4] = np.array([1], "<u4").view(np.uint8)
    plane[4:8] = np.array([10_000], "<u4").view(np.uint8)  # past the tensor's 5000 elements
    frame = zstandard.ZstdCompressor().compress(plane.tobytes())
    blobs["b"] = np.array([len(frame)], "<u8").tobytes() + frame
    targets = {n: v.copy() for n, v in base.items()}
    with pytest.raises(deltacodec.DeltaFormatError, match="^b: window 0: a change falls outside"):
        deltacodec.apply_many({n: (targets[n].view(np.uint8), blobs[n], 2) for n in targets}, weigh=True)
    np.testing.assert_array_equal(targets["b"], base["b"])
    for n in ("a", "c"):  # the other windows were applied in full before the error was raised
        np.testing.assert_array_equal(targets[n], new[n])


def test_the_worker_threads_run_nested_work_inline_and_finish_every_job_before_an_error():
    import threading
    import time

    from storage import cores

    finished = []

    def job(i: int) -> int:
        if i == 0:
            raise ValueError("first")
        time.sleep(0.05)
        finished.append(i)
        return sum(cores.each(lambda j: j * i, [1, 2, 3]))  # from a worker: inline, never queued behind itself

    with pytest.raises(ValueError, match="first"):
        cores.each(job, [0, 1, 2, 3])
    assert sorted(finished) == [1, 2, 3]  # every job ended before the error reached the caller
    assert cores.each(job, [1, 2]) == [6, 12]
    names = cores.each(lambda _: threading.current_thread().name, [0, 1])
    assert all(n.startswith("baton-cores") for n in names)
    assert cores.submit(lambda: cores.submit(lambda: 7).result()).result(timeout=5) == 7
