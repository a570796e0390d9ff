"""Level-4 pickles are read without running code: a real malicious file must do nothing."""

from __future__ import annotations

import os
import pickle

import numpy as np
import paddle
import pytest

import storage
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
