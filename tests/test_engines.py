"""FastDeploy and SGLang servers in the fleet: staging under FastDeploy's names, Hugging Face exports for SGLang,
and ``sync-weights`` driving a mixed fleet (a real ``baton serve``, a FastDeploy double and an SGLang double, each
over real HTTP) forward and back. The doubles (``tests/engine_doubles.py``) speak each engine's documented API
and load files by its documented rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from prefect.testing.utilities import prefect_test_harness

import storage
from flows.fleet import Server
from flows.sync import FleetSyncError, sync_weights
from infer.config import get_config
from infer.launch import baton_serve
from infer.model import build_model, random_state_dict
from infer.weights import state_digest
from storage.errors import TornSnapshotError
from storage.export import EXPORT_RECORD, export_hf_dir, read_record, stage_fastdeploy, stage_record
from storage.tp import split_state_dict
from tests.conftest import free_port
from tests.engine_doubles import FastDeployDouble, SGLangDouble, digests
from tests.test_publish_hf import hf_layout, write_hf_dir
from tests.test_server_errors import in_process

CONFIG = get_config("tiny")
SMALL, LARGE = 24 << 10, 96 << 10  # part sizes: the versions differ in how many parts they have
HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": CONFIG.hidden,
             "intermediate_size": CONFIG.intermediate, "num_hidden_layers": CONFIG.layers,
             "num_attention_heads": CONFIG.heads, "num_key_value_heads": CONFIG.kv_heads,
             "vocab_size": CONFIG.vocab_size, "tie_word_embeddings": False}


def state(seed: int) -> dict[str, np.ndarray]:
    return random_state_dict(CONFIG, seed)


def publish(root: str, version: str, seed: int, tp: int = 1, part_bytes: int = SMALL) -> list[dict]:
    shards = split_state_dict(state(seed), tp) if tp > 1 else [state(seed)]
    for rank, shard in enumerate(shards):
        storage.publish(shard, root, version, rank, part_bytes=part_bytes)
    return shards


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def fd_parts(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.glob("model_state.*.part*.pdparams"))


def test_fastdeploy_staging_names_every_rank_by_its_gpu_and_leaves_no_stale_part(tmp_path):
    snap, model_dir = str(tmp_path / "snap"), tmp_path / "fd"
    v1 = publish(snap, "v1", 1, tp=2, part_bytes=SMALL)
    v2 = publish(snap, "v2", 2, tp=2, part_bytes=LARGE)
    model_dir.mkdir()
    (model_dir / "model_state.tp0.9.part1.pdparams").write_bytes(b"another worker's file")
    double = FastDeployDouble(model_dir, [4, 6], [{n: np.zeros_like(a) for n, a in s.items()} for s in v1])

    record = stage_fastdeploy(snap, "v1", str(model_dir), [4, 6])
    assert record["state"] == "staged" and record["version"] == "v1"
    names = fd_parts(model_dir)
    assert set(record["files"]) | {"model_state.tp0.9.part1.pdparams"} == set(names)
    many = len([n for n in names if n.startswith("model_state.tp0.4.")])
    assert many > 2 and f"model_state.tp0.4.part{many}.pdparams" in names and "model_state.tp1.6.part1.pdparams" in names
    snapshot_part = tmp_path / "snap" / "model_state.tp0.v1.part0.pdparams"
    assert os.stat(model_dir / "model_state.tp0.4.part1.pdparams").st_ino == os.stat(snapshot_part).st_ino  # linked
    double.load_all()
    assert [digests(p) for p in double.params] == [digests(s) for s in v1]

    record = stage_fastdeploy(snap, "v2", str(model_dir), [4, 6])
    fewer = len([n for n in fd_parts(model_dir) if n.startswith("model_state.tp0.4.")])
    assert fewer < many and set(fd_parts(model_dir)) == set(record["files"]) | {"model_state.tp0.9.part1.pdparams"}
    double.load_all()
    assert [digests(p) for p in double.params] == [digests(s) for s in v2]

    with pytest.raises(ValueError, match="published for 2 ranks, the FastDeploy server has 1"):
        stage_fastdeploy(snap, "v1", str(model_dir), [4])
    publish(snap, "v3", 3, tp=2)
    flip_last_byte(tmp_path / "snap" / "model_state.tp1.v3.part1.pdparams")
    before = {n: (model_dir / n).read_bytes() for n in fd_parts(model_dir)}
    with pytest.raises(TornSnapshotError, match=r"tp1\.v3\.part1.*xxh3_128"):
        stage_fastdeploy(snap, "v3", str(model_dir), [4, 6])
    assert {n: (model_dir / n).read_bytes() for n in fd_parts(model_dir)} == before  # v2 untouched
    assert read_record(str(model_dir), stage_record([4, 6]))["version"] == "v2"
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".baton-stage")]


def test_two_fastdeploy_servers_sharing_a_model_dir_are_staged_apart(tmp_path):
    """Two servers on GPUs 0 and 1 over one model directory, staged at the same time with different versions."""
    from concurrent.futures import ThreadPoolExecutor

    snap, model_dir = str(tmp_path / "snap"), tmp_path / "fd"
    v1, v2 = publish(snap, "v1", 1), publish(snap, "v2", 2, part_bytes=LARGE)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: stage_fastdeploy(snap, job[0], str(model_dir), [job[1]]), [("v1", 0), ("v2", 1)]))
    assert read_record(str(model_dir), stage_record([0]))["version"] == "v1"
    assert read_record(str(model_dir), stage_record([1]))["version"] == "v2"
    for gpu, want in ((0, v1), (1, v2)):
        double = FastDeployDouble(model_dir, [gpu], [{n: np.zeros_like(a) for n, a in want[0].items()}])
        double.load_all()
        assert digests(double.params[0]) == digests(want[0])


def test_export_joins_the_ranks_into_a_transformers_layout_directory(tmp_path):
    snap, out = str(tmp_path / "snap"), tmp_path / "exports"
    publish(snap, "v1", 1, tp=2)
    path = export_hf_dir(snap, "v1", str(out), json.dumps(HF_CONFIG).encode())
    assert Path(path) == out / "v1"
    assert digests(SGLangDouble.read(out / "v1")) == digests(hf_layout(state(1)))
    assert json.loads((out / "v1" / "config.json").read_text()) == HF_CONFIG
    assert read_record(path, EXPORT_RECORD)["version"] == "v1"
    stamp = (out / "v1" / EXPORT_RECORD).stat().st_mtime_ns
    assert export_hf_dir(snap, "v1", str(out), b"{}") == path and (out / "v1" / EXPORT_RECORD).stat().st_mtime_ns == stamp

    publish(snap, "v2", 2)
    flip_last_byte(tmp_path / "snap" / "model_state.tp0.v2.part1.pdparams")
    with pytest.raises(TornSnapshotError, match="xxh3_128"):
        export_hf_dir(snap, "v2", str(out), json.dumps(HF_CONFIG).encode())
    assert sorted(p.name for p in out.iterdir()) == ["v1"]  # nothing half-written left


def test_a_server_entry_names_what_its_kind_needs():
    with pytest.raises(ValueError, match="needs model_dir"):
        Server.parse({"url": "http://h:1", "kind": "fastdeploy"})
    with pytest.raises(ValueError, match="extra"):
        Server.parse({"url": "http://h:1", "kind": "sglang", "model_dir": "/x", "gpus": [0]})
    fd = Server.parse('{"url": "http://h:1/", "kind": "fastdeploy", "model_dir": "/m", "gpu_ids": [2, 3]}')
    assert (fd.url, fd.gpu_ids, fd.api) == ("http://h:1", [2, 3], "auto")
    assert Server.parse("http://h:2#rank=1").rank == 1


# ---- sync-weights over a mixed fleet -------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def baton_version(url: str) -> tuple[str | None, str | None]:
    now = httpx.get(f"{url}/v1/weights", timeout=10).json()
    return now["version"], now["digest"]


def digest_of(seed: int) -> str:
    return state_digest(build_model(CONFIG, state(seed)).state_dict())


def held(url: str) -> object:
    return httpx.get(f"{url}/debug/weights", timeout=10).json()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A Baton server, a FastDeploy double (legacy API, GPU 3) and an SGLang double over one snapshot root."""
    root = tmp_path_factory.mktemp("mixed")
    snap = str(root / "snap")
    publish(snap, "v1", 1, part_bytes=SMALL)
    publish(snap, "v2", 2, part_bytes=LARGE)
    publish(snap, "v3", 3)
    original = write_hf_dir(root / "sgl-original", state(0))
    (Path(original) / "config.json").write_text(json.dumps(HF_CONFIG))
    fd = FastDeployDouble(root / "fd", [3], [{n: np.zeros_like(a) for n, a in state(0).items()}])
    (root / "fd").mkdir()
    sgl = SGLangDouble(Path(original))
    with baton_serve(snap, ready=False) as baton, in_process(fd.app()) as fd_url, in_process(sgl.app()) as sgl_url:
        servers = [str(baton), {"url": fd_url, "kind": "fastdeploy", "model_dir": str(root / "fd"), "gpu_ids": [3]},
                   {"url": sgl_url, "kind": "sglang", "model_dir": str(root / "sgl")}]
        yield {"root": root, "snap": snap, "servers": servers, "fd": fd, "sgl": sgl, "original": original,
               "urls": (str(baton), fd_url, sgl_url)}


def assert_fleet_serves(mixed, version: str, seed: int) -> None:
    baton, fd_url, sgl_url = mixed["urls"]
    assert baton_version(baton) == (version, digest_of(seed))
    assert held(fd_url) == [digests(state(seed))]
    record = read_record(str(mixed["root"] / "fd"), stage_record([3]))
    assert (record["state"], record["version"]) == ("live", version)
    info = httpx.get(f"{sgl_url}/get_model_info").json()
    assert (info["model_path"], info["weight_version"]) == (str(mixed["root"] / "sgl" / version), version)
    assert held(sgl_url) == digests(hf_layout(state(seed)))


def test_a_mixed_fleet_takes_each_version_and_rolls_back_together(mixed):
    rows = sync_weights("v1", mixed["snap"], mixed["servers"])
    assert [r["status"] for r in rows] == ["live"] * 3
    assert_fleet_serves(mixed, "v1", 1)
    assert mixed["fd"].calls == ["clear_load_weight", "update_model_weight"]
    many = fd_parts(mixed["root"] / "fd")

    sync_weights("v2", mixed["snap"], mixed["servers"])
    assert_fleet_serves(mixed, "v2", 2)
    assert len(fd_parts(mixed["root"] / "fd")) < len(many)  # v1's extra parts are gone: FastDeploy would load them

    down = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(FleetSyncError) as err:
        sync_weights("v3", mixed["snap"], [*mixed["servers"], down])
    message = str(err.value)
    assert f"{down}: unreachable" in message and message.count(": rolled back: ") == 3, message
    assert_fleet_serves(mixed, "v2", 2)
    assert sorted(p.name for p in (mixed["root"] / "sgl").iterdir()) == ["v2", "v3"]  # v1's export pruned


def test_a_fastdeploy_load_that_fails_half_way_is_restored_with_the_fleet(mixed):
    sync_weights("v2", mixed["snap"], mixed["servers"])
    mixed["fd"].fail_next = True  # its next load dies after one tensor, leaving the worker torn
    with pytest.raises(FleetSyncError, match="refused") as err:
        sync_weights("v3", mixed["snap"], mixed["servers"])
    assert "--dynamic-load-weight" in str(err.value) and "rolled back to v2" in str(err.value)
    assert_fleet_serves(mixed, "v2", 2)


def test_sglang_refusing_a_version_keeps_its_weights_and_the_fleet_rolls_back(mixed, tmp_path):
    sync_weights("v2", mixed["snap"], mixed["servers"])
    wrong = tmp_path / "config.json"
    wrong.write_text(json.dumps(HF_CONFIG | {"hidden_size": 2 * CONFIG.hidden}))
    servers = [*mixed["servers"][:2], mixed["servers"][2] | {"config": str(wrong), "model_dir": str(tmp_path / "x")}]
    with pytest.raises(FleetSyncError) as err:
        sync_weights("v3", mixed["snap"], servers)
    assert "refused" in str(err.value) and "hidden_size" in str(err.value)
    assert_fleet_serves(mixed, "v2", 2)


def test_a_fastdeploy_server_on_the_newer_api_pauses_updates_and_resumes(tmp_path):
    snap = str(tmp_path / "snap")
    publish(snap, "v1", 1)
    publish(snap, "v2", 2)
    fd = FastDeployDouble(tmp_path / "fd", [0], [{n: np.zeros_like(a) for n, a in state(0).items()}], "v1")
    (tmp_path / "fd").mkdir()
    with in_process(fd.app()) as url:
        server = {"url": url, "kind": "fastdeploy", "model_dir": str(tmp_path / "fd")}
        for version, seed in (("v1", 1), ("v2", 2)):
            rows = sync_weights(version, snap, [server])
            assert rows[0]["status"] == "live" and rows[0]["bytes"] > 0
            assert held(url) == [digests(state(seed))]
    assert fd.calls == ["pause", "update_weights", "resume"] * 2


def test_the_cli_and_the_scheduled_flow_drive_the_mixed_fleet(mixed, tmp_path, capsys):
    from baton_cli import main
    from flows.checkpoint import DONE_MARKER
    from flows.watch import publish_new_checkpoints
    from tests.test_flows import write_checkpoint

    args = ["sync", "v1", "--snapshot-root", mixed["snap"]]
    for server in mixed["servers"]:
        args += ["--server", server if isinstance(server, str) else json.dumps(server)]
    assert main(args) == 0
    assert capsys.readouterr().out.count(" live v1 ") == 3
    assert_fleet_serves(mixed, "v1", 1)

    trainer = tmp_path / "trainer"
    write_checkpoint(trainer / "step_7", state(7), 1)
    (trainer / "step_7" / DONE_MARKER).write_text("")
    result = publish_new_checkpoints(str(trainer), mixed["snap"], mixed["servers"], keep_last=2, part_bytes=SMALL)
    assert result["synced"] and result["published"]
    assert_fleet_serves(mixed, "step_7", 7)
    again = publish_new_checkpoints(str(trainer), mixed["snap"], mixed["servers"], keep_last=2, part_bytes=SMALL)
    assert not again["synced"]  # every kind reports step_7 live, so nothing is reloaded
