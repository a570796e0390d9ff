"""The Prefect flows for real: Prefect's test harness (a real local API), real `baton serve` processes, real
storage on disk and on the loopback S3 server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import paddle
import pytest
from prefect.client.orchestration import get_client
from prefect.testing.utilities import prefect_test_harness

import storage
from flows.checkpoint import DONE_MARKER
from flows.publish import publish_checkpoint
from flows.sync import FleetSyncError, sync_weights
from flows.watch import publish_new_checkpoints
from harness.launch import baton_serve
from infer.config import get_config
from infer.model import build_model, random_state_dict
from infer.weights import state_digest
from storage.tp import merge_state_dicts, split_state_dict
from storage.trainer import Checkpoint
from tests.conftest import free_port
from tests.test_publish_hf import write_hf_dir

CONFIG = get_config("tiny")
PART = 64 * 1024


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_checkpoint(directory: Path, state: dict, trainer_tp: int) -> str:
    """What a Paddle trainer leaves: one ``paddle.save`` file, or ``model_state.tp{r}.pdparams`` per rank."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: paddle.to_tensor(v) for k, v in state.items()}
    if trainer_tp == 1:
        paddle.save(tensors, str(directory / "model_state.pdparams"))
    else:
        for rank, shard in enumerate(split_state_dict(tensors, trainer_tp)):
            paddle.save(shard, str(directory / f"model_state.tp{rank}.pdparams"))
    return str(directory)


def loaded_full_state(root: str, version: str, serving_tp: int) -> dict:
    shards = [storage.load_snapshot(root, version, rank=r).state_dict for r in range(serving_tp)]
    return merge_state_dicts([{k: v.numpy() for k, v in s.items()} for s in shards])


def digest_of(seed: int) -> str:
    return state_digest(build_model(CONFIG, random_state_dict(CONFIG, seed)).state_dict())


def weights(url) -> dict:
    return httpx.get(f"{url}/v1/weights", timeout=10).json()


@pytest.mark.parametrize("trainer_tp,serving_tp", [(1, 1), (2, 1), (1, 2), (4, 2)])
def test_publish_reshards_to_the_serving_degree(tmp_path, trainer_tp, serving_tp):
    state = random_state_dict(CONFIG, seed=trainer_tp * 10 + serving_tp)
    source = write_checkpoint(tmp_path / "ckpt", state, trainer_tp)
    assert Checkpoint(source).degrees == (trainer_tp, 1)
    rows = publish_checkpoint(source, str(tmp_path / "snap"), "v1", part_bytes=PART, tp_size=serving_tp)
    assert [r["rank"] for r in rows] == list(range(serving_tp)) and all(r["bytes"] > 0 for r in rows)
    merged = loaded_full_state(str(tmp_path / "snap"), "v1", serving_tp)
    for name, value in state.items():
        np.testing.assert_array_equal(merged[name], value)


def test_publish_leaves_a_table_artifact_and_is_idempotent(tmp_path):
    source = write_checkpoint(tmp_path / "ckpt", random_state_dict(CONFIG, 1), 1)
    publish_checkpoint(source, str(tmp_path / "snap"), "v7", part_bytes=PART)
    again = publish_checkpoint(source, str(tmp_path / "snap"), "v7", part_bytes=PART)
    assert again[0]["note"] == "already published"

    async def artifacts():
        async with get_client() as client:
            return await client.read_artifacts()

    found = {(a.key, a.type) for a in asyncio.run(artifacts())}
    assert ("publish-v7", "table") in found
    assert any(kind == "progress" for _, kind in found)


def test_publish_on_a_local_dask_cluster(tmp_path):
    state = random_state_dict(CONFIG, seed=3)
    source = write_checkpoint(tmp_path / "ckpt", state, 2)
    publish_checkpoint(source, str(tmp_path / "snap"), "v1", part_bytes=PART, tp_size=2, runner="dask")
    merged = loaded_full_state(str(tmp_path / "snap"), "v1", 2)
    np.testing.assert_array_equal(merged["lm_head.weight"], state["lm_head.weight"])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """Two servers over one snapshot root, empty at first."""
    root = tmp_path_factory.mktemp("fleet")
    with baton_serve(str(root / "snap"), ready=False) as a, baton_serve(str(root / "snap"), ready=False) as b:
        yield root, [str(a), str(b)]


def test_sync_publishes_and_every_server_serves_the_version(fleet):
    root, servers = fleet
    source = write_checkpoint(root / "ckpt-1", random_state_dict(CONFIG, 1), 2)
    rows = sync_weights("s1", str(root / "snap"), servers, source=source, part_bytes=PART)
    assert [r["status"] for r in rows] == ["live", "live"] and all(r["published"] for r in rows)
    for url in servers:
        assert weights(url)["version"] == "s1" and weights(url)["digest"] == digest_of(1)


def test_sync_from_a_hugging_face_directory(fleet):
    """``source`` may be a Hugging Face directory (sharded safetensors, ``[out, in]`` weights): converted as it is
    read, then served bit-exact (resharding it: ``tests/test_publish_hf.py``)."""
    root, servers = fleet
    source = write_hf_dir(root / "hf-5", random_state_dict(CONFIG, 5), shard_bytes=200 << 10)
    rows = sync_weights("hf5", str(root / "snap"), servers, source=source, part_bytes=PART)
    assert [r["status"] for r in rows] == ["live", "live"]
    for url in servers:
        assert weights(url)["version"] == "hf5" and weights(url)["digest"] == digest_of(5)


def test_a_bad_snapshot_is_not_retried_and_leaves_the_fleet_unchanged(fleet):
    root, servers = fleet
    sync_weights("s1", str(root / "snap"), servers)  # the known starting point (no publish: it exists)
    source = write_checkpoint(root / "ckpt-2", random_state_dict(CONFIG, 2), 1)
    publish_checkpoint(source, str(root / "snap"), "bad", part_bytes=PART)
    part = root / "snap" / "model_state.tp0.bad.part1.pdparams"
    data = bytearray(part.read_bytes())
    data[-3] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(FleetSyncError, match="refused") as err:
        sync_weights("bad", str(root / "snap"), servers, on_failure="keep")
    assert all(url in str(err.value) for url in servers)
    for url in servers:
        assert weights(url)["version"] == "s1"
        metrics = httpx.get(f"{url}/metrics").text
        # asked once, no retries; the default reads once, so the flip is found while writing and undone
        assert 'baton_weight_updates_total{outcome="restored"} 1.0' in metrics
        assert "bad_snapshot" not in metrics


def test_a_server_down_at_prepare_commits_nothing(fleet, tmp_path):
    """One server prepares the new version, one is down: nothing is committed, the first never serves it."""
    root, servers = fleet
    sync_weights("s1", str(root / "snap"), servers)
    source = write_checkpoint(root / "ckpt-3", random_state_dict(CONFIG, 3), 1)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(FleetSyncError) as err:
        sync_weights("s3", str(root / "snap"), [servers[0], down], source=source, part_bytes=PART)
    message = str(err.value)
    assert f"{down}: unreachable" in message and f"{servers[0]}: aborted" in message
    assert weights(servers[0])["version"] == "s1" and weights(servers[0])["digest"] == digest_of(1)
    sync_weights("s3", str(root / "snap"), servers)  # the version itself was fine
    assert {weights(url)["version"] for url in servers} == {"s3"}


def test_sync_through_s3(s3_endpoint, tmp_path):
    snap = f"s3://baton-test/flows-{tmp_path.name}"
    source = write_checkpoint(tmp_path / "ckpt", random_state_dict(CONFIG, 4), 1)
    with baton_serve(snap, ready=False) as url:
        rows = sync_weights("s3-v1", snap, [str(url)], source=source, part_bytes=PART)
        assert rows[0]["status"] == "live" and weights(url)["digest"] == digest_of(4)


def make_step(trainer: Path, step: int, seed: int, done: bool = True) -> None:
    write_checkpoint(trainer / f"step_{step}", random_state_dict(CONFIG, seed), 1)
    if done:
        (trainer / f"step_{step}" / DONE_MARKER).write_text("")


def test_scheduled_flow_takes_the_newest_completed_checkpoint_once_and_prunes(tmp_path):
    trainer, snap = tmp_path / "trainer", str(tmp_path / "snap")
    make_step(trainer, 1, seed=11)
    make_step(trainer, 2, seed=12)
    make_step(trainer, 3, seed=13, done=False)  # still being written
    with baton_serve(snap, ready=False) as url:
        first = publish_new_checkpoints(str(trainer), snap, [str(url)], keep_last=1, part_bytes=PART)
        assert first["version"] == "step_2" and first["published"] and first["synced"]
        assert weights(url)["digest"] == digest_of(12)
        again = publish_new_checkpoints(str(trainer), snap, [str(url)], keep_last=1, part_bytes=PART)
        assert again == {"version": "step_2", "published": False, "synced": False, "pruned": []}
        (trainer / "step_3" / DONE_MARKER).write_text("")
        make_step(trainer, 4, seed=14, done=False)
        third = publish_new_checkpoints(str(trainer), snap, [str(url)], keep_last=1, part_bytes=PART)
        assert third["version"] == "step_3" and weights(url)["digest"] == digest_of(13)
        # keep_last=1 keeps step_3 (served) and step_2 (what a rollback needs); nothing older existed
        assert {v.version for v in storage.list_versions(snap)} == {"step_2", "step_3"}
        make_step(trainer, 4, seed=14)
        fourth = publish_new_checkpoints(str(trainer), snap, [str(url)], keep_last=1, part_bytes=PART)
        assert fourth["pruned"] == ["step_2"]
        assert {v.version for v in storage.list_versions(snap)} == {"step_3", "step_4"}


