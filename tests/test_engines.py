"""SGLang servers as their code behaves, Hugging Face exports for them, and ``sync-weights`` driving a mixed fleet
(a real ``baton serve``, a FastDeploy double and an SGLang double, each over real HTTP, all serving one Qwen2
model) forward and back. The doubles (``tests/engine_doubles.py``) follow each engine's sources."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.fastdeploy import stage_fastdeploy, stage_record
from flows.fleet import Server
from flows.sync import FleetSyncError, sync_weights
from harness.launch import baton_serve
from infer.config import get_config
from infer.hf import config_from_hf
from infer.model import build_model, random_state_dict
from infer.weights import state_digest
from storage import read_record
from storage.errors import TornSnapshotError
from storage.hfexport import EXPORT_RECORD, export_hf_dir
from tests.conftest import free_port
from tests.engine_doubles import FastDeployDouble, SGLangDouble, digests
from tests.test_fastdeploy import canonical, fd_expected, fd_parts, model_dir_for, publish, qwen
from tests.test_publish_hf import hf_layout, write_hf_dir
from tests.test_server_errors import in_process
from tests.test_tokenizer import qwen_style

TINY = get_config("tiny")
TINY_HF = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": TINY.hidden,
           "intermediate_size": TINY.intermediate, "num_hidden_layers": TINY.layers,
           "num_attention_heads": TINY.heads, "num_key_value_heads": TINY.kv_heads,
           "vocab_size": TINY.vocab_size, "tie_word_embeddings": False}
DOC = qwen(vocab_size=384)  # the model every server of the fleet runs (its tokenizer has 332 tokens)


def state(seed: int) -> dict[str, np.ndarray]:
    return canonical(DOC, seed)


def hf_dir(path: Path, doc: dict, weights: dict) -> str:
    """A Hugging Face directory of ``weights`` (canonical) with ``doc`` as its config."""
    write_hf_dir(path, weights)
    (path / "config.json").write_text(json.dumps(doc))
    return str(path)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_export_joins_the_ranks_into_a_transformers_layout_directory(tmp_path):
    snap, out = str(tmp_path / "snap"), tmp_path / "exports"
    publish(snap, "v1", random_state_dict(TINY, 1), tp=2)
    path = export_hf_dir(snap, "v1", str(out), json.dumps(TINY_HF).encode())
    assert Path(path) == out / "v1"
    assert digests(SGLangDouble.read(out / "v1")) == digests(hf_layout(random_state_dict(TINY, 1)))
    assert json.loads((out / "v1" / "config.json").read_text()) == TINY_HF
    assert read_record(path, EXPORT_RECORD)["version"] == "v1"
    stamp = (out / "v1" / EXPORT_RECORD).stat().st_mtime_ns
    assert export_hf_dir(snap, "v1", str(out), b"{}") == path
    assert (out / "v1" / EXPORT_RECORD).stat().st_mtime_ns == stamp

    publish(snap, "v2", random_state_dict(TINY, 2))
    flip_last_byte(tmp_path / "snap" / "model_state.tp0.v2.part1.pdparams")
    with pytest.raises(TornSnapshotError, match="xxh3_128"):
        export_hf_dir(snap, "v2", str(out), json.dumps(TINY_HF).encode())
    assert sorted(p.name for p in out.iterdir()) == ["v1"]  # nothing half-written left


def test_a_server_entry_names_what_its_kind_needs():
    with pytest.raises(ValueError, match="needs model_dir"):
        Server.parse({"url": "http://h:1", "kind": "fastdeploy"})
    with pytest.raises(ValueError, match="extra"):
        Server.parse({"url": "http://h:1", "kind": "sglang", "model_dir": "/x", "gpus": [0]})
    fd = Server.parse('{"url": "http://h:1/", "kind": "fastdeploy", "model_dir": "/m", "gpu_ids": [2, 3]}')
    assert (fd.url, fd.gpu_ids, fd.api) == ("http://h:1", [2, 3], "auto")
    assert Server.parse("http://h:2#rank=1").rank == 1


def test_sglang_does_not_restore_itself_which_is_why_baton_checks_first(tmp_path):
    """The double, loaded directly (no Baton): what SGLang's code does with exports that do not fit."""
    three = qwen(num_hidden_layers=3)
    sgl = SGLangDouble(Path(hf_dir(tmp_path / "served", three, canonical(three, 0))))
    original = digests(sgl.params)
    two = hf_dir(tmp_path / "two", qwen(num_hidden_layers=2), canonical(qwen(num_hidden_layers=2), 1))
    ok, _ = sgl.update(two, "two")
    now = digests(sgl.params)
    assert ok and sgl.model_path == two  # reported live...
    assert now["model.layers.2.mlp.up_proj.weight"] == original["model.layers.2.mlp.up_proj.weight"]  # ...a mix
    assert now["model.layers.0.mlp.up_proj.weight"] != original["model.layers.0.mlp.up_proj.weight"]

    sgl = SGLangDouble(Path(tmp_path / "served"))
    wide = qwen(num_hidden_layers=3, intermediate_size=128)
    ok, message = sgl.update(hf_dir(tmp_path / "wide", wide, canonical(wide, 2)), "wide")
    now = digests(sgl.params)
    assert not ok and "Rolling back to original weights" in message and sgl.model_path == str(tmp_path / "served")
    assert now["model.embed_tokens.weight"] != original["model.embed_tokens.weight"]  # half-loaded


# ---- sync-weights over a mixed fleet -------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def baton_version(url: str) -> tuple[str | None, str | None]:
    now = httpx.get(f"{url}/v1/weights", timeout=10).json()
    return now["version"], now["digest"]


def digest_of(seed: int) -> str:
    return state_digest(build_model(config_from_hf(DOC), state(seed)).state_dict())


def held(url: str) -> object:
    return httpx.get(f"{url}/debug/weights", timeout=10).json()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A Baton server, a FastDeploy double (legacy API, GPU 3) and an SGLang double over one snapshot root, each
    started from seed 0's weights."""
    root = tmp_path_factory.mktemp("mixed")
    snap = str(root / "snap")
    publish(snap, "v0", state(0))
    publish(snap, "v1", state(1))
    publish(snap, "v2", state(2), part_bytes=96 << 10)
    publish(snap, "v3", state(3))
    original = hf_dir(root / "original", DOC, state(0))
    qwen_style(Path(original))
    fd_dir = model_dir_for(root / "fd", DOC)
    stage_fastdeploy(snap, "v0", str(fd_dir), [3])  # the snapshot FastDeploy starts from
    fd = FastDeployDouble(fd_dir, [3])
    sgl = SGLangDouble(Path(original))
    with baton_serve(snap, "--model-dir", original, ready=False) as baton, in_process(fd.app()) as fd_url, \
            in_process(sgl.app()) as sgl_url:
        servers = [str(baton), {"url": fd_url, "kind": "fastdeploy", "model_dir": str(fd_dir), "gpu_ids": [3]},
                   {"url": sgl_url, "kind": "sglang", "model_dir": str(root / "sgl")}]
        yield {"root": root, "snap": snap, "servers": servers, "fd": fd, "sgl": sgl, "original": original,
               "urls": (str(baton), fd_url, sgl_url)}


def assert_fleet_serves(mixed, version: str, seed: int) -> None:
    baton, fd_url, sgl_url = mixed["urls"]
    assert baton_version(baton) == (version, digest_of(seed))
    assert held(fd_url) == [digests(fd_expected(hf_layout(state(seed)), DOC, 1)[0])]
    record = read_record(str(mixed["root"] / "fd"), stage_record([3]))
    assert (record["state"], record["version"]) == ("live", version)
    info = httpx.get(f"{sgl_url}/model_info").json()
    assert (info["model_path"], info["weight_version"]) == (str(mixed["root"] / "sgl" / version), version)
    assert held(sgl_url) == digests(hf_layout(state(seed)))


def test_a_mixed_fleet_takes_each_version_and_rolls_back_together(mixed):
    rows = sync_weights("v1", mixed["snap"], mixed["servers"])
    assert [r["status"] for r in rows] == ["live"] * 3
    assert_fleet_serves(mixed, "v1", 1)
    assert mixed["fd"].calls == ["clear_load_weight", "update_model_weight"]
    assert mixed["sgl"].calls[-1]["abort_all_requests"] is False
    many = fd_parts(mixed["root"] / "fd")

    sync_weights("v2", mixed["snap"], mixed["servers"])
    assert_fleet_serves(mixed, "v2", 2)
    assert len(fd_parts(mixed["root"] / "fd")) < len(many)  # v1's extra parts are gone: FastDeploy would load them

    down = f"http://127.0.0.1:{free_port()}"
    fd_calls, sgl_calls = len(mixed["fd"].calls), len(mixed["sgl"].calls)
    with pytest.raises(FleetSyncError) as err:
        sync_weights("v3", mixed["snap"], [*mixed["servers"], down])
    message = str(err.value)
    assert f"{down}: unreachable" in message and message.count(": aborted: ") == 3, message
    # prepared (staged, exported) but never told to load: no engine served v3 at any moment
    assert (len(mixed["fd"].calls), len(mixed["sgl"].calls)) == (fd_calls, sgl_calls)
    assert_fleet_serves(mixed, "v2", 2)
    assert sorted(p.name for p in (mixed["root"] / "sgl").iterdir()) == ["v2"]  # v3's never served, v1's old


def test_a_fastdeploy_load_that_fails_half_way_is_restored_with_the_fleet(mixed):
    sync_weights("v2", mixed["snap"], mixed["servers"])
    mixed["fd"].fail_loads = 1  # its next load dies after one tensor, leaving the worker torn
    with pytest.raises(FleetSyncError, match="refused") as err:
        sync_weights("v3", mixed["snap"], mixed["servers"])
    assert "--dynamic-load-weight" in str(err.value) and "rolled back to v2" in str(err.value)
    assert_fleet_serves(mixed, "v2", 2)


def test_an_sglang_load_that_fails_half_way_is_rolled_back_by_baton(mixed):
    sync_weights("v2", mixed["snap"], mixed["servers"])
    mixed["sgl"].fail_loads = 1  # SGLang answers "rolling back" but keeps what it copied of v3
    with pytest.raises(FleetSyncError) as err:
        sync_weights("v3", mixed["snap"], mixed["servers"])
    assert "Rolling back to original weights" in str(err.value) and str(err.value).count("rolled back to v2") == 3
    assert_fleet_serves(mixed, "v2", 2)


def test_a_version_that_does_not_fit_sglangs_model_never_reaches_it(mixed, tmp_path):
    sync_weights("v2", mixed["snap"], mixed["servers"])
    publish(mixed["snap"], "deeper", canonical(qwen(num_hidden_layers=3), 4))
    calls = len(mixed["sgl"].calls)
    with pytest.raises(FleetSyncError) as err:
        sync_weights("deeper", mixed["snap"], mixed["servers"][2:])
    assert "refused" in str(err.value) and "not in the server's model: model.layers.2." in str(err.value)
    assert len(mixed["sgl"].calls) == calls  # never called
    wrong = tmp_path / "config.json"
    wrong.write_text(json.dumps(DOC | {"architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(FleetSyncError, match=r"runs \['Qwen2ForCausalLM'\]"):
        sync_weights("v3", mixed["snap"], [mixed["servers"][2] | {"config": str(wrong)}])
    assert len(mixed["sgl"].calls) == calls
    assert_fleet_serves(mixed, "v2", 2)


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
    result = publish_new_checkpoints(str(trainer), mixed["snap"], mixed["servers"], keep_last=2, part_bytes=24 << 10)
    assert result["synced"] and result["published"]
    assert_fleet_serves(mixed, "step_7", 7)
    again = publish_new_checkpoints(str(trainer), mixed["snap"], mixed["servers"], keep_last=2, part_bytes=24 << 10)
    assert not again["synced"]  # every kind reports step_7 live, so nothing is reloaded
