"""The GPU serving path's contracts, checked on CPU: what the dispatcher hands a Triton launcher, which stream
every launch runs on, the KV cache's dtype and the weight digest that must not copy a GPU model to the host. The
GPU itself is exercised by ``bench/gpu_check.py`` where one is lent."""

from __future__ import annotations

import math
import os
import types

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere in this process

import numpy as np
import paddle
import pytest

import kernels
import storage
from infer import digest
from infer.config import get_config
from infer.kvcache import KVPool, kv_dtype
from infer.model import build_model, random_state_dict
from kernels import dispatch


class Recorder(types.SimpleNamespace):
    """A stand-in for ``kernels.triton_ops``: records every tensor each launcher receives."""

    def __init__(self):
        super().__init__(calls=[])
        for op in ("cast_copy_", "rms_norm", "rotary_", "swiglu", "decode_attention"):
            setattr(self, op, self._record(op))

    def _record(self, op):
        def launcher(*args):
            self.calls.append((op, [a for a in args if isinstance(a, paddle.Tensor)]))
        return launcher


@pytest.fixture
def recorder(monkeypatch):
    """The dispatcher believes every tensor is on a GPU and sends it to the recorder."""
    fake = Recorder()
    monkeypatch.setattr(dispatch, "_gpu", lambda x: fake)
    return fake


def test_the_dispatcher_hands_launchers_only_contiguous_tensors_on_one_place(recorder):
    strided = paddle.arange(24, dtype="float32").reshape([4, 6])[:, ::2]  # every other column: a strided view
    assert not strided.is_contiguous()
    dispatch.cast_copy_(paddle.zeros([4, 3]), strided)
    dispatch.rms_norm(strided, paddle.ones([6])[::2], 1e-6, residual=strided)
    dispatch.swiglu(strided, strided)
    q, k = paddle.zeros([1, 2, 2, 4]), paddle.zeros([1, 2, 1, 4])
    dispatch.rotary_(q, k, paddle.ones([2, 4])[:, ::2], paddle.ones([2, 4])[:, ::2])
    pages = paddle.zeros([1, 3, kernels.PAGE, 4], "float16")  # not the CPU kernel's float32: the GPU route
    dispatch.decode_attention(paddle.zeros([2, 2, 4], "float16"), pages, pages, paddle.ones([4, 2], "int64").T,
                              paddle.ones([2], "int64"), 0.5)
    assert [op for op, _ in recorder.calls] == ["cast_copy_", "rms_norm", "swiglu", "rotary_", "decode_attention"]
    for op, tensors in recorder.calls:
        assert all(t.is_contiguous() for t in tensors), op
        assert len({str(t.place) for t in tensors}) == 1, op


def test_a_tensor_parallel_shard_view_is_written_by_the_reference_not_a_launcher(recorder):
    """A TP-2 update writes each rank's files into strided column views of the full weight (``shard_views``):
    never a Triton launcher's input, which would read them as contiguous memory."""
    full = {"model.layers.0.self_attn.q_proj.weight": paddle.zeros([4, 6])}
    want = np.arange(24, dtype=np.float32).reshape(4, 6)
    for rank in range(2):
        view = storage.shard_views(full, rank, 2)["model.layers.0.self_attn.q_proj.weight"]
        assert not view.is_contiguous()
        dispatch.cast_copy_(view, paddle.to_tensor(want[:, rank * 3:(rank + 1) * 3].copy()))
    assert recorder.calls == []
    assert np.array_equal(full["model.layers.0.self_attn.q_proj.weight"].numpy(), want)


def test_a_host_shard_is_moved_to_the_devices_place_before_its_strided_write(recorder, monkeypatch):
    """The TP shard path: a host ``src`` written into a strided view of a GPU weight crosses to the GPU once, whole,
    before the element-wise write (a host tensor assigned into device memory would cross op by op, or not at
    all). No CUDA here: the view reports a GPU place and the host-to-device copy is recorded, not made."""
    full = paddle.zeros([4, 6])
    name = "model.layers.0.self_attn.q_proj.weight"
    view = storage.shard_views({name: full}, 1, 2)[name]
    gpu, real_place, moved = GpuPlace(0), paddle.Tensor.place, []
    monkeypatch.setattr(paddle.Tensor, "place", property(lambda t: gpu if t is view else real_place.__get__(t)))

    def to(t, place):
        moved.append((t.shape, place))
        return t

    monkeypatch.setattr(paddle.Tensor, "to", to)
    want = np.arange(12, dtype=np.float32).reshape(4, 3)
    dispatch.cast_copy_(view, paddle.to_tensor(want))
    assert moved == [([4, 3], gpu)] and recorder.calls == []
    assert np.array_equal(full.numpy()[:, 3:], want) and not full.numpy()[:, :3].any()


class GpuPlace(paddle.base.libpaddle.Place):
    """Paddle's own place type, the one a GPU tensor's ``.place`` has, reporting a device index (this CPU build
    cannot make a real CUDA place)."""

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def gpu_device_id(self) -> int:
        return self.index


def raw_streams(monkeypatch) -> list[int]:
    """Replaces only the C call that needs CUDA (Paddle's raw stream of a device index, which segfaults on a CPU
    build) and records the indices it is asked for; Paddle reports itself compiled with CUDA."""
    asked: list[int] = []

    def raw_stream(device: int) -> int:
        if not isinstance(device, int):  # the real binding, `_get_current_raw_stream(arg0: int)`, refuses the rest
            raise TypeError(f"_get_current_raw_stream(): incompatible function arguments: {device!r}")
        asked.append(device)
        return 0xBEEF + device

    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.base.libpaddle, "_get_current_raw_stream", raw_stream)
    return asked


def test_stream_of_takes_a_paddle_tensors_own_place(monkeypatch):
    """The first launch on a Paddle tensor: its ``.place`` is a ``libpaddle.Place``, not a ``CUDAPlace``."""
    from kernels import triton_ops

    asked = raw_streams(monkeypatch)
    assert triton_ops.stream_of(types.SimpleNamespace(place=GpuPlace(0))) == (0, 0xBEEF)
    assert asked == [0]


class FakeUtils:
    """Triton's CUDA utils as far as the current device goes: which primary context is current on the thread."""

    def __init__(self, current: int):
        self.current = current

    def get_current_device(self) -> int:
        return self.current

    def set_current_device(self, device: int) -> None:
        if not isinstance(device, int):  # Triton's driver.c parses its argument as a C int ("i")
            raise TypeError(f"an integer is required, not {type(device).__name__}")
        self.current = device


class FakeDriver:
    def __init__(self, current: int = 0):
        self.utils = FakeUtils(current)

    def get_current_device(self):
        return self.utils.current

    def get_current_stream(self, device=None):
        return "torch's stream"


class Kernel:
    """Records what Triton's ``JITFunction.run`` would read at launch: the driver's device and stream, and which
    device's context is current."""

    def __init__(self, fail: bool = False):
        self.seen, self.fail = [], fail

    def __getitem__(self, grid):
        import triton

        def run(*args, **meta):
            active = triton.runtime.driver.active
            device = active.get_current_device()
            self.seen.append((device, active.get_current_stream(device), active.utils.current))
            if self.fail:
                raise RuntimeError("the kernel failed")
        return run


@pytest.fixture
def driver(monkeypatch) -> FakeDriver:
    """Launches go through Triton's driver (not the interpreter), which is a stand-in whose current context is
    gpu:0."""
    import triton

    fake = FakeDriver(current=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton.runtime.driver, "_active", fake)
    return fake


def test_every_launch_runs_on_the_stream_paddle_reports_for_the_tensors_device(monkeypatch, driver):
    from kernels import triton_ops

    asked = raw_streams(monkeypatch)
    kernel = Kernel()
    triton_ops.launch(kernel, (1,), types.SimpleNamespace(place=GpuPlace(1)), 3, BLOCK=4)
    assert asked == [1] and [seen[:2] for seen in kernel.seen] == [(1, 0xBEEF + 1)]
    assert driver.get_current_stream() == "torch's stream"  # restored after the launch


def test_a_launch_makes_the_tensors_device_current_and_puts_the_previous_one_back(monkeypatch, driver):
    from kernels import triton_ops

    raw_streams(monkeypatch)
    kernel = Kernel()
    triton_ops.launch(kernel, (1,), types.SimpleNamespace(place=GpuPlace(1)), 3, BLOCK=4)
    assert [seen[2] for seen in kernel.seen] == [1] and driver.utils.current == 0
    failing = Kernel(fail=True)
    with pytest.raises(RuntimeError, match="the kernel failed"):
        triton_ops.launch(failing, (1,), types.SimpleNamespace(place=GpuPlace(1)), 3, BLOCK=4)
    assert [seen[2] for seen in failing.seen] == [1] and driver.utils.current == 0


def test_every_launcher_goes_through_the_stream_pinning_launch(monkeypatch):
    import torch

    from kernels import triton_ops

    launched = []
    monkeypatch.setattr(triton_ops, "launch", lambda kernel, grid, *args, **meta: launched.append(kernel.fn.__name__))
    x = torch.zeros(2, 8)
    triton_ops.cast_copy_(x, torch.ones(2, 8))
    triton_ops.rms_norm(x, torch.ones(8), 1e-6, torch.empty(2, 8))
    triton_ops.swiglu(x, x, torch.empty(2, 8))
    q, k = torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 1, 8)
    triton_ops.rotary_(q, k, torch.ones(2, 4), torch.ones(2, 4))
    pages = torch.zeros(1, 3, 16, 8)
    triton_ops.decode_attention(torch.zeros(2, 2, 8), pages, pages, torch.ones(2, 2, dtype=torch.int64),
                                torch.ones(2, dtype=torch.int64), 0.5, torch.empty(2, 2, 8))
    assert sorted(set(launched)) == sorted({"_cast_copy_kernel", "_rms_norm_kernel", "_swiglu_kernel",
                                            "_rotary_kernel", "_decode_attention_kernel"})


class GpuPlace0(GpuPlace):
    """A GPU place as the dtype rule asks it: not the CPU."""

    def is_cpu_place(self) -> bool:
        return False

    def is_gpu_place(self) -> bool:
        return True


def test_the_kv_cache_takes_the_models_dtype_on_a_gpu():
    assert kv_dtype("bfloat16", GpuPlace0(0)) == "bfloat16" and kv_dtype("float16", GpuPlace0(1)) == "float16"
    assert kv_dtype("bfloat16", paddle.CPUPlace()) == "float32"  # the compiled CPU attention reads float32 pages
    config = get_config("tiny", dtype="bfloat16")
    assert KVPool.page_bytes(config, "bfloat16") * 2 == KVPool.page_bytes(config, "float32")


def test_the_kv_cache_follows_the_models_place_not_paddles_default_device(monkeypatch):
    """A model on the CPU while the process-wide default says gpu:0: its cache is the CPU kernel's float32 pages,
    and a generation runs."""
    from infer.engine import Engine
    from infer.generate import Fixed, generate
    from infer.sampling import SamplingParams

    config = get_config("tiny", dtype="bfloat16")
    model = build_model(config)
    want = generate(model, [[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0))[0].tokens
    monkeypatch.setattr(paddle, "get_device", lambda: "gpu:0")
    monkeypatch.setattr(paddle.framework, "_current_expected_place", lambda: GpuPlace0(0))
    pool = Engine(Fixed(model), config).pool
    assert pool.dtype == "float32" and pool.k[0].place.is_cpu_place()
    assert generate(model, [[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0))[0].tokens == want


def test_a_gpu_models_kv_cache_is_made_on_its_place_in_its_dtype(monkeypatch):
    """A source whose copies live on gpu:0 (no CUDA memory here: the page allocation is recorded instead)."""
    from infer.engine import Engine

    config = get_config("tiny", dtype="bfloat16")
    made = []

    def new_kv_pages(kv_heads, pages, dim, dtype, place):
        made.append((dtype, place.gpu_device_id()))
        return paddle.zeros([1]), paddle.zeros([1])

    monkeypatch.setattr(kernels, "new_kv_pages", new_kv_pages)
    source = types.SimpleNamespace(place=GpuPlace0(0), acquire=None, release=None)
    assert Engine(source, config).pool.dtype == "bfloat16"
    assert made == [("bfloat16", 0)] * config.layers


def test_every_tensor_of_an_attention_plan_is_made_on_the_plans_place(monkeypatch):
    """The masks and indices a step's plan makes go where its pages are, never to Paddle's default device."""
    from infer.kvcache import Group, PagedStep

    config = get_config("tiny")
    pool = KVPool(config, 8, place=paddle.CPUPlace())
    step = PagedStep(pool, np.arange(3), [Group(0, np.array([[1, 2]]), np.array([[0, 1, 2]]))], config.heads)
    to_tensor, places = paddle.to_tensor, []

    def recording(data, dtype=None, place=None, stop_gradient=True):
        places.append(place)
        return to_tensor(data, dtype, place, stop_gradient)

    monkeypatch.setattr(paddle, "to_tensor", recording)
    plan = step.groups[0][2]
    for name in ("bias", "keep", "page_table", "lengths", "index"):
        getattr(plan, name)
    assert len(places) == 5 and all(p == pool.place for p in places)
    causal = kernels.causal_attention(*(paddle.zeros([1, 3, config.heads, config.head_dim], "float16")
                                        for _ in range(3)), 0.5)
    assert causal.shape == [1, 3, config.heads, config.head_dim]
    assert all(p is not None and p.is_cpu_place() for p in places)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_device_digest_is_the_host_formula(dtype, monkeypatch):
    monkeypatch.setattr(digest, "CHUNK", 1000)  # several chunks, the last one short
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal(2500).astype(np.float32)).astype(dtype)
    assert int(digest.device_sum64(x)) & (2**64 - 1) == digest.sum64(digest._words(x))


def test_a_gpu_models_digest_moves_no_weights_to_the_host(monkeypatch):
    config = get_config("tiny")
    params = build_model(config, random_state_dict(config, 3)).state_dict()
    host = {n: t.numpy() for n, t in params.items()}
    monkeypatch.setattr(digest, "_on_device", lambda t: not isinstance(t, np.ndarray))  # as if on a GPU

    def no_copy(t):
        raise AssertionError("a weight was copied to the host")

    monkeypatch.setattr(digest, "host_array", no_copy)
    on_gpu = digest.state_digest(params)
    assert on_gpu.startswith("sum64-") and on_gpu == digest.state_digest(host, "sum64")
    host["model.norm.weight"] = host["model.norm.weight"] + 1
    assert digest.state_digest(host, "sum64") != on_gpu


def test_a_gpu_models_digest_crosses_to_the_host_once(monkeypatch):
    """One transfer of one number per tensor for the whole update, not a device sync per tensor."""
    config = get_config("tiny")
    params = build_model(config, random_state_dict(config, 4)).state_dict()
    want = digest.state_digest({n: t.numpy() for n, t in params.items()}, "sum64")
    monkeypatch.setattr(digest, "_on_device", lambda t: not isinstance(t, np.ndarray))  # as if on a GPU
    transfers = []
    for method in ("numpy", "cpu", "item", "tolist"):
        real = getattr(paddle.Tensor, method)

        def counted(t, *args, _real=real, _method=method, **kwargs):
            transfers.append((_method, list(t.shape)))
            return _real(t, *args, **kwargs)

        monkeypatch.setattr(paddle.Tensor, method, counted)
    assert digest.state_digest(params) == want
    assert transfers == [("numpy", [len(params)])]


@pytest.mark.parametrize("dtype,words", [("bfloat16", np.uint16), ("float16", np.uint16), ("float32", np.uint32),
                                         ("int64", np.uint64), ("bool", np.uint8)])
def test_the_delta_apply_kernel_xors_the_named_elements_in_the_tensors_own_memory(dtype, words):
    t = paddle.to_tensor(np.arange(24, dtype=np.float32).reshape(4, 6) % 2).astype(dtype)
    before = digest.host_array(t).copy()
    index = np.array([0, 7, 23], np.int64)
    xors = np.array([1, 0x80, 1], np.uint64)
    same = t  # the same tensor object: written in place, not replaced
    dispatch.xor_at_(t, index, xors)
    want = np.ascontiguousarray(before).reshape(-1).view(words).copy()
    want[index] ^= xors.astype(words)
    assert same is t and np.array_equal(np.ascontiguousarray(digest.host_array(t)).reshape(-1).view(words), want)


def test_a_delta_onto_device_targets_sends_only_its_changes(tmp_path, monkeypatch):
    """The server's GPU path (``copy_fn`` and ``xor_fn`` given): each changed tensor takes its delta in place, never
    read out to the host whole nor written back whole. Paddle CPU tensors stand in for device ones."""
    from storage import deltaload, reader

    config = get_config("tiny", dtype="bfloat16")
    model = build_model(config, random_state_dict(config, 5))
    base = {n: t.clone() for n, t in model.state_dict().items()}
    rng = np.random.default_rng(0)
    new = {}
    for name, t in base.items():
        bits = digest.host_array(t).copy()
        flat = bits.reshape(-1)
        flat[rng.random(flat.size) < 0.05] ^= np.uint16(1)
        new[name] = paddle.to_tensor(bits).view(paddle.bfloat16)
    storage.publish(dict(base), str(tmp_path), "v0")
    assert storage.publish(new, str(tmp_path), "v1", base="v0").kind == "delta"
    targets = model.state_dict()
    plan = reader.load_plan(str(tmp_path), "v1", 0, targets)
    assert plan.path == "delta"

    def whole(*args, **kwargs):
        raise AssertionError("a whole tensor crossed to the host and back")

    monkeypatch.setattr(deltaload, "host_bytes", whole)
    monkeypatch.setattr(deltaload, "copy_converted", whole)
    reader.apply_plan(plan, targets, verify="none", cast=True, copy_fn=kernels.cast_copy_, xor_fn=kernels.xor_at_)
    for name, t in new.items():
        assert np.array_equal(digest.host_array(targets[name]), digest.host_array(t)), name


def test_sum64_is_the_position_weighted_word_sum():
    """``storage.digest.sum64`` against the formula written out in numpy's wrapping uint64 arithmetic."""
    from storage.digest import ADD, MUL, sum64

    words = np.random.default_rng(1).integers(0, 1 << 16, 10_001, dtype=np.uint16)
    i = np.arange(words.size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        want = int((words.astype(np.uint64) * (i * np.uint64(MUL) + np.uint64(ADD))).sum(dtype=np.uint64))
    assert sum64(words) == want


def bf16_versions(root: str) -> tuple[dict, dict]:
    """v0 (full) and v1 (a delta on it: a few elements of every tensor one bf16 step away), as Paddle tensors."""
    config = get_config("tiny", dtype="bfloat16")
    base = {n: t.clone() for n, t in build_model(config, random_state_dict(config, 5)).state_dict().items()}
    rng, new = np.random.default_rng(0), {}
    for name, t in base.items():
        bits = digest.host_array(t).copy()
        flat = bits.reshape(-1)
        flat[rng.random(flat.size) < 0.05] ^= np.uint16(1)
        flat[0] ^= np.uint16(1)
        new[name] = paddle.to_tensor(bits).view(paddle.bfloat16)
    storage.publish(dict(base), root, "v0")
    assert storage.publish(new, root, "v1", base="v0").kind == "delta"
    return base, new


def test_every_manifest_records_its_ranks_sum64_digest(tmp_path):
    """Full and delta versions alike, equal to what a server computes over the same weights in place."""
    base, new = bf16_versions(str(tmp_path))
    for version, state in (("v0", base), ("v1", new)):
        manifest = storage.resolve(str(tmp_path), version).manifest
        assert manifest.sum64 == digest.state_digest(state, "sum64")
        assert manifest.digest == digest.state_digest(state, "xxh3")


def test_a_manifests_sum64_field_is_checked(tmp_path):
    import json

    from storage import layout
    from storage.manifest import Manifest

    storage.publish({"w": np.ones(4, np.float32)}, str(tmp_path), "a")
    path = tmp_path / layout.manifest_name(0, "a")
    doc = json.loads(path.read_bytes())
    assert Manifest.from_json(path.read_bytes(), str(path)).sum64 == doc["sum64"]
    del doc["sum64"]  # a manifest written before sum64: still read
    assert Manifest.from_json(json.dumps(doc).encode(), str(path)).sum64 is None
    doc["sum64"] = "sum64-XYZ"
    with pytest.raises(storage.TornSnapshotError, match="sum64"):
        Manifest.from_json(json.dumps(doc).encode(), str(path))


@pytest.mark.parametrize("mode", ["in_place", "double_buffer"])
def test_a_delta_on_a_gpu_copies_no_whole_tensor_to_the_host(tmp_path, monkeypatch, mode):
    """The server's GPU path end to end: the base proven by the copy's own ``sum64`` against the held version's
    manifest, the changes XORed in place, the result checked by ``sum64`` in place, and double_buffer's spare started
    from the live copy. Paddle CPU tensors stand in for device ones: the model says it is on a GPU and the digest
    treats its tensors as device tensors; every whole-tensor route to the host is closed for the delta."""
    from infer.model import Decoder
    from infer.weights import WeightManager
    from storage import deltaload
    from storage import digest as storage_digest

    bf16_versions(str(tmp_path))
    monkeypatch.setattr(Decoder, "on_gpu", property(lambda self: True))
    monkeypatch.setattr(digest, "_on_device", lambda t: not isinstance(t, np.ndarray))
    manager = WeightManager(get_config("tiny", dtype="bfloat16"), str(tmp_path), mode=mode)
    assert manager.update("v0").digest.startswith("sum64-")

    def whole(*args, **kwargs):
        raise AssertionError("a whole tensor was copied to the host")

    for module, name in ((deltaload, "host_bytes"), (deltaload, "copy_converted"), (storage_digest, "host_bytes"),
                         (digest, "host_array")):
        monkeypatch.setattr(module, name, whole)
    sizes = {int(t.numel()) for t in manager.live.model.state_dict().values()}
    transfers = []
    for method in ("numpy", "cpu"):
        real = getattr(paddle.Tensor, method)

        def counted(t, *args, _real=real, **kwargs):
            transfers.append(math.prod(t.shape))
            return _real(t, *args, **kwargs)

        monkeypatch.setattr(paddle.Tensor, method, counted)
    info = manager.update("v1")
    assert info.path == "delta" and info.digest == storage.resolve(str(tmp_path), "v1").manifest.sum64
    assert transfers and not sizes & set(transfers)  # a few small transfers, none of a weight's size
