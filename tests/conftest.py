"""Fixtures: real storage backends (local dir, memory://, a loopback S3 server) and small real state dicts."""

from __future__ import annotations

import os
import socket
import uuid
from unittest import mock

import numpy as np
import pytest

BUCKET = "baton-test"


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server (moto) on 127.0.0.1, started here and stopped at the end of the session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "BATON_S3_ENDPOINT": endpoint}
    with mock.patch.dict(os.environ, env):  # put back as it was afterwards
        import fsspec

        fs = fsspec.filesystem("s3", endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_fetched(monkeypatch):
    """A list that, once a test calls ``start()`` on it, receives the size of every object body the S3 server sends."""
    import s3fs

    class Fetched(list):
        def start(self) -> None:
            real = s3fs.S3FileSystem._call_s3
            fetched = self

            async def counting(fs, method, *args, **kwargs):
                out = await real(fs, method, *args, **kwargs)
                if method == "get_object":
                    fetched.append(out["ContentLength"])
                return out

            monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)

    return Fetched()


@pytest.fixture(params=["file", "memory", "s3"])
def root(request, tmp_path):
    """A fresh, empty snapshot root on each backend."""
    if request.param == "file":
        yield str(tmp_path / "snapshots")
    elif request.param == "memory":
        from fsspec.implementations.memory import MemoryFileSystem

        yield f"memory://baton-{uuid.uuid4().hex}"
        MemoryFileSystem.store.clear()
        MemoryFileSystem.pseudo_dirs.clear()
        MemoryFileSystem.pseudo_dirs.append("")
    else:
        request.getfixturevalue("s3_endpoint")
        yield f"s3://{BUCKET}/{uuid.uuid4().hex}"


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_state(seed: int = 0, scale: int = 1) -> dict:
    """A small model-shaped Paddle state dict with several dtypes, including bfloat16 and an odd shape."""
    import paddle

    rng = np.random.default_rng(seed)
    return {
        "embed.weight": paddle.to_tensor(rng.standard_normal((64 * scale, 32), np.float32)),
        "layers.0.attn.qkv.weight": paddle.to_tensor(rng.standard_normal((32, 96), np.float32)),
        "layers.0.mlp.down.weight": paddle.to_tensor(rng.standard_normal((48, 32), np.float32)).astype("bfloat16"),
        "layers.0.norm.weight": paddle.to_tensor(rng.standard_normal(32).astype(np.float16)),
        "layers.0.odd": paddle.to_tensor(rng.standard_normal((3, 5, 7), np.float32)),
        "step": paddle.to_tensor(np.array([seed], np.int64)),
    }


def zeros_like(state: dict) -> dict:
    import paddle

    return {k: paddle.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}


def as_numpy(t) -> np.ndarray:
    import paddle

    if isinstance(t, np.ndarray):
        return t
    return t.astype("float32").numpy() if t.dtype == paddle.bfloat16 else t.numpy()


def assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(as_numpy(a[k]), as_numpy(b[k]), err_msg=k)
