"""Level-4 pickles are read without running code: a real malicious file must do nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
from collections import OrderedDict
from pathlib import Path

import numpy as np
import paddle
import pytest

import storage
from storage.pickle_safe import load_state_pickle
from tests.conftest import assert_same, make_state, zeros_like


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    fallback = tmp_path / "shared"
    fallback.mkdir()
    payload = {"embed.weight": np.zeros((2, 2), np.float32), "evil": _Exploit(str(marker))}
    (fallback / "model_state.tp0.5.pdparams").write_bytes(pickle.dumps(payload, protocol=4))
    # sanity: plain pickle really would run it
    pickle.loads(pickle.dumps(_Exploit(str(tmp_path / "proof"))))
    assert (tmp_path / "proof").exists()
    with pytest.raises(storage.UnsafeCheckpointError, match="system"):
        storage.load_snapshot(str(tmp_path / "empty"), "5", into={}, fallback_dir=str(fallback))
    assert not marker.exists()


def test_paddle_save_pickle_loads_including_bfloat16(tmp_path):
    state = make_state(3)
    paddle.save(state, str(tmp_path / "model_state.tp1.8.pdparams"))
    target = zeros_like(state)
    report = storage.load_snapshot(str(tmp_path / "nothing"), "8", rank=1, into=target, fallback_dir=str(tmp_path))
    assert report.level == 4 and report.source == "shared fallback dir"
    assert_same(target, state)


@pytest.mark.parametrize("protocol", [2, 4])
def test_paddle_save_protocols(tmp_path, protocol):
    state = {"w": paddle.randn([4, 3])}
    paddle.save(state, str(tmp_path / "model_state.tp0.1.pdparams"), protocol=protocol)
    target = {"w": paddle.zeros([4, 3])}
    storage.load_snapshot(str(tmp_path / "x"), "1", into=target, fallback_dir=str(tmp_path))
    assert_same(target, state)


def test_non_tensor_entries_are_refused(tmp_path):
    (tmp_path / "model_state.tp0.2.pdparams").write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(storage.UnsafeCheckpointError, match="not a tensor"):
        storage.load_snapshot(str(tmp_path / "x"), "2", into={}, fallback_dir=str(tmp_path))


def test_a_trainer_file_is_read_into_tensors_that_equal_what_was_saved(tmp_path):
    """``read_state_file`` (the flows' reader) adopts the unpickled arrays without copying: values, dtypes
    (bfloat16 included) and empty tensors come through exactly."""
    from storage import read_state_file

    state = make_state(seed=4) | {"empty": paddle.zeros([0, 3]).astype("bfloat16")}
    paddle.save(state, str(tmp_path / "model_state.pdparams"))
    loaded = read_state_file(str(tmp_path / "model_state.pdparams"))
    assert {k: v.dtype for k, v in loaded.items()} == {k: v.dtype for k, v in state.items()}
    assert_same(loaded, state)


# ---------------------------------------------------------------------------------------------------------------
# Baton's own interpreter (no pickle.Unpickler): hostile bytes are refused without crashing, hanging or ballooning.

P = pickle
ROOT = Path(__file__).resolve().parents[1]


def proto(version: int = 2) -> bytes:
    return P.PROTO + bytes([version])


def uni(s: str) -> bytes:
    raw = s.encode()
    return P.BINUNICODE + struct.pack("<I", len(raw)) + raw


def raw_bytes(b: bytes) -> bytes:
    return P.BINBYTES + struct.pack("<I", len(b)) + b


def glob(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def i32(n: int) -> bytes:
    return P.BININT + struct.pack("<i", n)


def num(n: int) -> bytes:
    if -2**31 <= n < 2**31:
        return i32(n)
    raw = n.to_bytes(9, "little", signed=True)
    return P.LONG1 + bytes([len(raw)]) + raw


def array_ops(code: str, order: str, shape: tuple[int, ...], data_ops: bytes, flags: int = 0) -> bytes:
    """The opcodes numpy writes for an array (protocol 3), with ``data_ops`` pushing its bytes."""
    return (glob("numpy.core.multiarray", "_reconstruct") + glob("numpy", "ndarray")
            + P.BININT1 + b"\0" + P.TUPLE1 + raw_bytes(b"b") + P.TUPLE3 + P.REDUCE
            + P.MARK + P.BININT1 + b"\1" + P.MARK + b"".join(num(n) for n in shape) + P.TUPLE
            + glob("numpy", "dtype") + uni(code) + P.NEWFALSE + P.NEWTRUE + P.TUPLE3 + P.REDUCE
            + P.MARK + P.BININT1 + b"\3" + uni(order) + P.NONE * 3 + i32(-1) + i32(-1) + i32(flags) + P.TUPLE
            + P.BUILD + P.NEWFALSE + data_ops + P.TUPLE + P.BUILD)


def one_array(code: str, order: str, shape: tuple[int, ...], data: bytes, flags: int = 0) -> bytes:
    """``{"w": array}`` written opcode by opcode."""
    array = array_ops(code, order, shape, raw_bytes(data), flags)
    return proto(3) + P.EMPTY_DICT + uni("w") + array + P.SETITEM + P.STOP


def refused(data: bytes, match: str | None = None) -> str:
    """The refusal for ``data``, read both from bytes and from a file object."""
    messages = []
    for source in (data, io.BytesIO(data)):
        with pytest.raises(storage.UnsafeCheckpointError, match=match) as info:
            load_state_pickle(source, "ckpt/model_state.pdparams")
        messages.append(str(info.value))
    assert all(m.startswith("ckpt/model_state.pdparams: refused to load") and "baton publish" in m for m in messages)
    return messages[0]


# Peak memory is read from /proc (VmRSS before, VmHWM after): ru_maxrss survives exec on Linux, so a child of
# this pytest process would start with pytest's own peak and report no growth at all.
_CHILD = r"""
import hashlib, json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from storage.errors import UnsafeCheckpointError
from storage.pickle_safe import load_state_pickle

def kib(field):
    return int(open("/proc/self/status").read().split(field + ":")[1].split()[0])

path, mode = sys.argv[1], sys.argv[2]
data = open(path, "rb").read() if mode == "bytes" else open(path, "rb")
before = kib("VmRSS")
start = time.perf_counter()
try:
    out = load_state_pickle(data, path)
except UnsafeCheckpointError as exc:
    result = {"refused": str(exc)}
else:
    result = {}
result["seconds"] = time.perf_counter() - start
result["growth"] = (kib("VmHWM") - before) * 1024
if "refused" not in result:
    result["loaded"] = {k: hashlib.sha256(v.data).hexdigest() for k, v in out.items()}
print(json.dumps(result))
"""


def in_child(tmp_path, data: bytes | None = None, mode: str = "bytes", file: Path | None = None,
             timeout: float = 60) -> dict:
    """Load in a fresh interpreter limited to 2 GiB of address space: a crash, hang or bomb there fails the
    test instead of taking pytest down."""
    if file is None:
        file = tmp_path / "attack.pdparams"
        file.write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(file), mode], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def test_a_key_nested_a_million_tuples_deep_is_refused_without_crashing(tmp_path):
    data = proto() + P.EMPTY_DICT + P.EMPTY_TUPLE + P.TUPLE1 * 1_000_000 + P.NONE + P.SETITEM + P.STOP
    result = in_child(tmp_path, data)
    assert "nested more than 32 deep" in result["refused"]
    assert result["seconds"] < 10


def test_a_shared_tuple_dag_key_is_refused_without_hashing_it(tmp_path):
    # t0 = (); t_i = (t_{i-1}, t_{i-1}) via memo GETs: 64 levels in ~400 bytes, 2**64 steps to hash
    levels = b"".join(P.BINGET + bytes([i]) + P.TUPLE2 + P.BINPUT + bytes([i + 1]) for i in range(64))
    data = proto() + P.EMPTY_DICT + P.EMPTY_TUPLE + P.BINPUT + b"\0" + levels + P.NONE + P.SETITEM + P.STOP
    result = in_child(tmp_path, data, timeout=60)
    assert "nested more than 32 deep" in result["refused"]
    assert result["seconds"] < 5
    # shallower than the depth cap it is still never hashed: keys must be str
    shallow = proto() + P.EMPTY_DICT + P.EMPTY_TUPLE + P.BINPUT + b"\0" + levels[:20 * 5] + P.NONE + P.SETITEM + P.STOP
    assert "dict key is a tuple; only str keys" in refused(shallow)


def test_a_huge_memo_index_costs_no_memory(tmp_path):
    # the C unpickler grew its array memo to 2**25 slots (+512 MiB) for these 16 bytes
    data = proto() + P.EMPTY_DICT + P.LONG_BINPUT + struct.pack("<I", 2**25) + P.NONE + P.LONG_BINPUT \
        + struct.pack("<I", 2**25 + 1) + P.STOP
    assert len(data) <= 16
    for mode in ("bytes", "file"):
        result = in_child(tmp_path, data, mode=mode)
        assert "memo index 33554432 at offset 3 skips past the 0 entries stored" in result["refused"]
        assert result["growth"] < 64 << 20
    assert "memo entry 7 is read at offset 2 but was never stored" in refused(proto() + P.BINGET + b"\7" + P.STOP)
    # what the pickler really writes: consecutive indices, which may be overwritten
    ok = proto() + P.EMPTY_DICT + P.BINPUT + b"\0" + P.BINPUT + b"\0" + P.MEMOIZE + P.BINPUT + b"\1" + P.STOP
    assert load_state_pickle(ok, "x") == {}


def test_a_deep_key_or_value_is_described_without_recursion():
    deep = P.EMPTY_TUPLE + P.TUPLE1 * 5000  # the old loader's {key!r} raised RecursionError on this
    message = refused(proto() + P.EMPTY_DICT + deep + P.NONE + P.SETITEM + P.STOP, "nested more than 32 deep")
    assert len(message) < 500
    value = P.EMPTY_TUPLE + P.TUPLE1 * 30  # within the depth cap: described by type only
    message = refused(proto() + P.EMPTY_DICT + uni("w") + value + P.SETITEM + P.STOP, "'w' is a tuple, not a tensor")
    assert len(message) < 500


def test_a_handwritten_array_pickle_loads_exactly():
    data = np.arange(6, dtype=np.float32).tobytes()
    pickled = one_array("f4", "<", (2, 3), data)
    expected = pickle.loads(pickled)["w"]
    for source in (pickled, io.BytesIO(pickled)):
        got = load_state_pickle(source, "x")["w"]
        assert got.dtype == expected.dtype and got.shape == expected.shape and got.tobytes() == expected.tobytes()


def test_an_object_dtype_with_zeroed_flags_is_refused():
    # numpy.dtype('O') whose pickled state sets the flags to 0: C pickle built an object array over raw pointer
    # bytes that passed the hasobject check. Dtypes come from the allow-list by code; flags are never read.
    message = refused(one_array("O8", "|", (2,), b"\x41" * 16, flags=0), "dtype '|O8' \\(object\\) is not supported")
    assert "float32" in message and "bfloat16" not in message  # lists what is supported, as numpy names


@pytest.mark.parametrize("dtype, shown", [(np.complex64, "complex64"), (np.dtype(">f4"), "float32, big-endian"),
                                          (np.dtype("<M8[s]"), "'<M8' (datetime64)"), (np.float128, "float128")])
def test_dtypes_outside_the_safetensors_set_are_refused_naming_file_and_dtype(dtype, shown):
    for protocol in (2, 3, 4):
        message = refused(pickle.dumps({"w": np.zeros(3, dtype)}, protocol=protocol), "is not supported")
        assert shown in message


def test_shapes_must_fit_the_data_exactly():
    good = np.arange(4, dtype=np.int64).tobytes()
    assert load_state_pickle(one_array("i8", "<", (2, 2), good), "x")["w"].tolist() == [[0, 1], [2, 3]]
    refused(one_array("i8", "<", (5,), good), "needs 40 bytes, its data has 32")
    refused(one_array("i8", "<", (3,), good), "needs 24 bytes, its data has 32")
    refused(one_array("i8", "<", (1,) * 33, good), "shape")
    refused(one_array("i8", "<", (0,) + (1 << 10,) * 31, b""), "shape")  # empty, but numpy could not even size it
    refused(one_array("i8", "<", (-4,), good), "shape")
    refused(one_array("i8", "<", (2**40, 0), b""), "shape")
    refused(one_array("i8", ">", (4,), good), "big-endian")


@pytest.mark.parametrize("opcode, width", [(P.BINBYTES8, 8), (P.BINUNICODE8, 8), (P.BINBYTES, 4), (P.BINUNICODE, 4),
                                           (P.FRAME, 8), (P.SHORT_BINBYTES, 1), (P.SHORT_BINUNICODE, 1)])
def test_length_fields_past_the_end_of_the_file_allocate_nothing(opcode, width):
    length = min(2**40, 2 ** (8 * width) - 1)
    data = proto(4) + P.EMPTY_DICT + uni("w") + opcode + length.to_bytes(width, "little") + b"xy" + P.SETITEM + P.STOP
    tracemalloc.start()
    try:
        message = refused(data, "runs past the end of the file")
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    assert f"of {length} bytes" in message


def test_a_file_shorter_than_its_size_is_refused():
    pickled = pickle.dumps({"w": np.ones(1000, np.float32)}, protocol=4)
    with pytest.raises(storage.UnsafeCheckpointError, match="the file ends at offset"):
        load_state_pickle(io.BytesIO(pickled[:-100]), "x", size=len(pickled))


@pytest.mark.parametrize("data, match", [
    (proto(4) + glob("os", "system") + uni("true") + P.TUPLE1 + P.REDUCE + P.STOP, "asks for os.system"),
    (proto(4) + glob("numpy", "ndarray") + P.EMPTY_TUPLE + P.REDUCE + P.STOP, "numpy.ndarray is called"),
    (proto(4) + glob("builtins", "bytes") + i32(2**30) + P.TUPLE1 + P.REDUCE + P.STOP, "builtins.bytes is called"),
    (proto(4) + P.EMPTY_DICT + uni("w") + P.NONE + P.BINPERSID + P.SETITEM + P.STOP, "opcode BINPERSID"),
    (proto(4) + P.EMPTY_LIST + P.BINPUT + b"\0" + P.BINGET + b"\0" + P.APPEND + P.STOP, "list is changed after"),
    (proto(4) + P.EMPTY_LIST + P.BINPUT + b"\0" + P.EMPTY_TUPLE + P.BINGET + b"\0" + P.TUPLE2 + P.POP, "opcode POP"),
    (proto(4) + P.EMPTY_DICT + P.MARK + P.TUPLE2 + P.STOP, "more values than the stack holds"),
    (proto(4) + P.EMPTY_DICT + P.APPENDS + P.STOP, "closes a MARK"),
    (proto(4) + P.EMPTY_DICT + P.NONE + P.STOP, "ends with 2 values"),
    (proto(0) + P.EMPTY_DICT + P.STOP, "protocol 0"),
    (proto(4) + P.EMPTY_DICT + uni("w") + P.EMPTY_TUPLE + P.BUILD + P.SETITEM + P.STOP, "BUILD at offset"),
])
def test_everything_else_is_refused_by_name(data, match):
    refused(data, match)


def test_memo_reuse_cannot_multiply_bytes():
    # one 1000-char string encoded (protocol 2's bytes) 50 times
    many = proto() + P.EMPTY_DICT + glob("_codecs", "encode") + P.BINPUT + b"\0" + uni("a" * 1000) + P.BINPUT \
        + b"\1" + P.MARK
    for i in range(50):
        many += uni(f"w{i}") + P.BINGET + b"\0" + P.BINGET + b"\1" + uni("latin1") + P.TUPLE2 + P.REDUCE
    refused(many + P.SETITEMS + P.STOP, "encodes more bytes than the file holds")
    # one 1000-byte buffer behind 50 arrays
    data = raw_bytes(b"\0" * 1000) + P.BINPUT + b"\0"
    shared = proto(3) + P.EMPTY_DICT + P.MARK + uni("w0") + array_ops("u1", "|", (1000,), data)
    for i in range(1, 50):
        shared += uni(f"w{i}") + array_ops("u1", "|", (1000,), P.BINGET + b"\0")
    refused(shared + P.SETITEMS + P.STOP, "arrays would hold more bytes than the file")
    # the array object itself may be shared (tied weights): built and counted once
    array = one_array("u1", "|", (1000,), b"\0" * 1000)
    tied = array[:-2] + P.BINPUT + b"\0" + P.SETITEM + uni("v") + P.BINGET + b"\0" + P.SETITEM + P.STOP
    out = load_state_pickle(tied, "x")
    assert out["w"] is out["v"]


def test_bare_tensors_ordered_dicts_fortran_arrays_and_scalars_load():
    class BareTensor:  # what paddle.save makes of a tensor: tuple((name, ndarray))
        def __init__(self, arr):
            self.arr = arr

        def __reduce__(self):
            return (tuple, (("eager_tmp_0", self.arr),))

    f = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4))
    state = OrderedDict([("t", BareTensor(np.ones(3, np.float16))), ("f", f), ("s", np.int64(7)),
                         ("e", np.zeros((0, 2), np.uint8)), ("z", np.array(True))])
    for protocol in (2, 3, 4):
        for source in (pickle.dumps(state, protocol=protocol), io.BytesIO(pickle.dumps(state, protocol=protocol))):
            out = load_state_pickle(source, "x")
            assert list(out) == ["t", "f", "s", "e", "z"]
            for k, want in [("t", np.ones(3, np.float16)), ("f", f), ("s", np.array(7, np.int64)),
                            ("e", np.zeros((0, 2), np.uint8)), ("z", np.array(True))]:
                assert out[k].dtype == want.dtype and out[k].shape == want.shape
                np.testing.assert_array_equal(out[k], want)


def _rich_state() -> dict:
    rng = np.random.default_rng(7)
    return {
        "f32": paddle.to_tensor(rng.standard_normal((5, 7), np.float32)),
        "f16": paddle.to_tensor(rng.standard_normal(9).astype(np.float16)),
        "bf16": paddle.to_tensor(rng.standard_normal((3, 4), np.float32)).astype("bfloat16"),
        "i64": paddle.to_tensor(rng.integers(-2**40, 2**40, 6)),
        "i32": paddle.to_tensor(rng.integers(-9, 9, (2, 2)).astype(np.int32)),
        "u8": paddle.to_tensor(np.arange(5, dtype=np.uint8)),
        "mask": paddle.to_tensor(rng.standard_normal(8) > 0),
        "scalar": paddle.to_tensor(2.5),
        "empty": paddle.zeros([0, 3]),
        "empty_bf16": paddle.zeros([2, 0]).astype("bfloat16"),
    }


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_paddle_save_round_trips_bit_exactly(tmp_path, protocol):
    state = _rich_state()
    path = tmp_path / "model_state.pdparams"
    paddle.save(state, str(path), protocol=protocol)
    expected = {k: v.numpy() for k, v in state.items()}
    with open(path, "rb") as f:
        from_file = load_state_pickle(f, str(path))
    from_bytes = load_state_pickle(path.read_bytes(), str(path))
    for out in (from_file, from_bytes):
        assert list(out) == list(expected)  # the name table is skipped
        for k, want in expected.items():
            assert out[k].dtype == want.dtype and out[k].shape == want.shape, k
            assert out[k].tobytes() == want.tobytes(), k
    assert from_file["bf16"].dtype == np.uint16  # paddle.save stores bfloat16 as its uint16 bits
    assert all(a.flags.writeable for a in from_file.values())  # file reads own their buffers


def test_paddle_save_numpy_arrays_directly(tmp_path):
    arrays = {"a": np.arange(10, dtype=np.float32), "b": np.ones((2, 3), np.int16)}
    paddle.save(arrays, str(tmp_path / "np.pdparams"))
    out = load_state_pickle((tmp_path / "np.pdparams").read_bytes(), "np")
    assert {k: v.tobytes() for k, v in out.items()} == {k: v.tobytes() for k, v in arrays.items()}


def test_a_50mb_state_dict_loads_in_about_its_own_size(tmp_path):
    rng = np.random.default_rng(0)
    state = {f"layers.{i}.weight": paddle.to_tensor(rng.standard_normal((1024, 1024), np.float32))
             for i in range(11)} | {"lm_head": paddle.to_tensor(rng.standard_normal((1024, 1024), np.float32))
                                      .astype("bfloat16"), "bias": paddle.zeros([7])}
    path = tmp_path / "model_state.pdparams"
    paddle.save(state, str(path))
    want = {k: hashlib.sha256(np.ascontiguousarray(v.numpy()).data).hexdigest() for k, v in state.items()}
    size = path.stat().st_size
    assert size > 45 << 20
    result = in_child(tmp_path, file=path, mode="file", timeout=120)
    assert result["loaded"] == want
    assert result["growth"] <= 1.5 * size, (result["growth"], size)
    result = in_child(tmp_path, file=path, mode="bytes", timeout=120)  # arrays are views of the bytes
    assert result["loaded"] == want
    assert result["growth"] <= 0.25 * size, (result["growth"], size)


def test_truncated_or_corrupted_pickles_load_or_are_refused_nothing_else(tmp_path):
    rng = np.random.default_rng(1)
    state = {"a": paddle.to_tensor(rng.standard_normal((2, 3), np.float32)),
             "b": paddle.to_tensor(rng.standard_normal(4, np.float32)).astype("bfloat16"),
             "c": paddle.to_tensor(np.array(5, np.int64))}
    outcomes = {"loaded": 0, "refused": 0}

    def attempt(data: bytes, source):
        try:
            out = load_state_pickle(source, "fuzz")
        except storage.UnsafeCheckpointError as exc:
            assert str(exc).startswith("fuzz: refused to load")
            outcomes["refused"] += 1
        else:
            assert all(isinstance(k, str) and isinstance(v, np.ndarray) and not v.dtype.hasobject
                       for k, v in out.items())
            outcomes["loaded"] += 1

    for protocol in (2, 4):
        paddle.save(state, str(tmp_path / "s.pdparams"), protocol=protocol)
        data = (tmp_path / "s.pdparams").read_bytes()
        for n in range(len(data)):
            attempt(data[:n], data[:n])
        for _ in range(300):
            corrupt = bytearray(data)
            for pos in rng.integers(0, len(data), rng.integers(1, 4)):
                corrupt[pos] = rng.integers(0, 256)
            attempt(bytes(corrupt), bytes(corrupt) if rng.integers(2) else io.BytesIO(bytes(corrupt)))
    assert outcomes["refused"] > 1000 and outcomes["loaded"] > 0


def test_a_lazy_index_leaves_tensor_bytes_in_the_file_and_reads_them_back_exactly(tmp_path):
    from storage.pickle_safe import LAZY_BYTES, Stored

    big = np.arange(LAZY_BYTES, dtype=np.float32).reshape(64, -1)
    state = {"big": paddle.to_tensor(big), "small": paddle.to_tensor(np.ones(3, np.float32)),
             "bf16": paddle.to_tensor(big).astype("bfloat16"), "fortran": paddle.to_tensor(np.asfortranarray(big))}
    path = tmp_path / "model_state.pdparams"
    paddle.save(state, str(path))
    with path.open("rb") as f:
        eager = load_state_pickle(f, "x")
    with path.open("rb") as f:
        lazy = load_state_pickle(f, "x", lazy=True)
        assert isinstance(lazy["small"], np.ndarray) and all(isinstance(lazy[k], Stored) for k in ("big", "bf16"))
        for name, stored in lazy.items():
            if isinstance(stored, Stored):
                f.seek(stored.offset)
                got = stored.array(f.read(stored.nbytes))
                assert got.dtype == eager[name].dtype and np.array_equal(got, eager[name]), name
    with path.open("rb") as f:  # a pickle that claims more bytes than the file holds is refused all the same
        data = bytearray(f.read())
    cut = tmp_path / "cut.pdparams"
    cut.write_bytes(bytes(data[:len(data) // 2]))
    with cut.open("rb") as f, pytest.raises(storage.UnsafeCheckpointError, match="runs past the end"):
        load_state_pickle(f, "cut", lazy=True)
