"""FastDeploy for real: each version staged in FastDeploy's own inference layout, loaded by a FastDeploy double that
holds FastDeploy's inference state dict (``tests/engine_doubles.py``, written from FastDeploy's sources), through
the calls that reload a snapshot. Every worker's expected tensors are computed here from the Hugging Face
checkpoint (``transformers``' ``[out, in]`` layout), head by head in numpy, never by Baton's export code."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest
from prefect.testing.utilities import prefect_test_harness

import storage
from flows.fastdeploy import stage_fastdeploy, stage_record
from flows.sync import FleetSyncError, sync_weights, update_server
from infer.hf import config_from_hf
from infer.model import parameter_shapes
from storage import read_record
from storage.errors import IncompatibleTargetError, TornSnapshotError
from storage.fastdeploy import VERSION_FILE
from storage.tp import split_state_dict
from tests.engine_doubles import FastDeployDouble, digests
from tests.test_publish_hf import hf_layout
from tests.test_server_errors import in_process

PART = 24 << 10
BF16 = np.uint16  # numpy holds bfloat16 as its bit pattern


def qwen(arch: str = "Qwen2ForCausalLM", **over) -> dict:
    doc = {"architectures": [arch], "model_type": arch[:5].lower(), "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300,
           "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "torch_dtype": "float32",
           "tie_word_embeddings": False}
    if arch == "Qwen3ForCausalLM":
        doc["head_dim"] = 32  # heads x head_dim != hidden, as in Qwen3 models: o_proj's rows follow the heads
    return doc | over


def canonical(doc: dict, seed: int) -> dict[str, np.ndarray]:
    """Random weights for every parameter of the model (norms too, so a misplaced one shows), canonical layout."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in parameter_shapes(config_from_hf(doc)).items():
        value = rng.standard_normal(shape, dtype=np.float32)
        out[name] = (value.view(np.uint32) >> 16).astype(BF16) if doc["torch_dtype"] == "bfloat16" else value
    return out


def fd_expected(hf: dict[str, np.ndarray], doc: dict, tp: int) -> list[dict[str, np.ndarray]]:
    """Each worker's FastDeploy tensors from a ``transformers``-layout checkpoint: heads picked one by one (kv head
    of rank r: ``(r * kv_heads) // tp``, FastDeploy's ``sharedkv_index``), fused in FastDeploy's orders (q|k|v,
    gate|up), transposed to ``[in, out]``, vocabulary zero-padded to 64 (the LM head only when tp does not divide
    it)."""
    qwen2 = doc["architectures"][0] == "Qwen2ForCausalLM"
    p = "qwen2" if qwen2 else "model"
    h, nh, kvh, inter, vocab = (doc[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                 "intermediate_size", "vocab_size"))
    hd = doc.get("head_dim") or h // nh
    padded = -(-vocab // 64) * 64
    head_cols = vocab if vocab % tp == 0 else padded

    def heads(x, which):  # [out, in] rows (or bias entries) of the given heads
        return np.concatenate([x[i * hd:(i + 1) * hd] for i in which])

    def pad_rows(x, n):
        out = np.zeros((n, *x.shape[1:]), x.dtype)
        out[:x.shape[0]] = x
        return out

    embed = pad_rows(hf["model.embed_tokens.weight"], padded)
    head = pad_rows(hf["model.embed_tokens.weight" if doc["tie_word_embeddings"] else "lm_head.weight"], head_cols)
    workers = []
    for r in range(tp):
        qs = range(r * nh // tp, (r + 1) * nh // tp)
        kvs = range(r * kvh // tp, (r + 1) * kvh // tp) if kvh >= tp else [(r * kvh) // tp]
        w = {f"{p}.embed_tokens.embeddings.weight": embed[r * padded // tp:(r + 1) * padded // tp]}
        for i in range(doc["num_hidden_layers"]):
            c, f = f"model.layers.{i}.", f"{p}.layers.{i}."
            q, k, v = (hf[f"{c}self_attn.{x}_proj.weight"] for x in "qkv")
            w[f"{f}self_attn.qkv_proj.weight"] = np.concatenate([heads(q, qs), heads(k, kvs), heads(v, kvs)]).T
            if qwen2:
                qb, kb, vb = (hf[f"{c}self_attn.{x}_proj.bias"] for x in "qkv")
                w[f"{f}self_attn.qkv_proj.bias"] = np.concatenate([heads(qb, qs), heads(kb, kvs), heads(vb, kvs)])
            o = hf[f"{c}self_attn.o_proj.weight"]  # [hidden, heads * hd]: this rank's heads are its input columns
            w[f"{f}self_attn.o_proj.weight"] = o[:, qs.start * hd:qs.stop * hd].T
            n = inter // tp
            gate, up = hf[f"{c}mlp.gate_proj.weight"], hf[f"{c}mlp.up_proj.weight"]
            w[f"{f}mlp.up_gate_proj.weight"] = np.concatenate([gate[r * n:(r + 1) * n], up[r * n:(r + 1) * n]]).T
            w[f"{f}mlp.down_proj.weight"] = hf[f"{c}mlp.down_proj.weight"][:, r * n:(r + 1) * n].T
            norms = ["input_layernorm", "post_attention_layernorm"] + ([] if qwen2 else ["self_attn.q_norm",
                                                                                          "self_attn.k_norm"])
            w.update({f"{f}{x}.weight": hf[f"{c}{x}.weight"] for x in norms})
        w[f"{p}.norm.weight"] = hf["model.norm.weight"]
        w["lm_head.linear.weight"] = head[r * head_cols // tp:(r + 1) * head_cols // tp].T
        workers.append(w)
    return workers


def model_dir_for(path: Path, doc: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(doc))
    return path


def publish(root: str, version: str, state: dict, tp: int = 1, part_bytes: int = PART) -> None:
    """``state`` published at ``tp`` ranks; uint16 arrays as bfloat16."""
    for rank, shard in enumerate(split_state_dict(state, tp) if tp > 1 else [state]):
        shard = {n: storage.TensorRef("BF16", a.shape, lambda a=a: a) if a.dtype == BF16 else a
                 for n, a in shard.items()}
        storage.publish(shard, root, version, rank, part_bytes=part_bytes)


def fd_parts(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.glob("model_state.*.part*.pdparams"))


CASES = {  # name: (config, serving GPUs, ranks the version is published with)
    "qwen2-tp1": (qwen(), [0], 1),
    "qwen2-tp2-tied-bf16": (qwen(tie_word_embeddings=True, torch_dtype="bfloat16"), [4, 6], 1),
    "qwen2-tp2-one-kv-head": (qwen(num_key_value_heads=1), [0, 1], 1),
    "qwen2-tp4-kv-heads-below-tp": (qwen(), [0, 1, 2, 3], 2),  # 2 kv heads over 4 workers; published at TP 2
    "qwen2-tp1-from-tp2": (qwen(vocab_size=320), [2], 2),
    "qwen3-tp1": (qwen("Qwen3ForCausalLM"), [0], 1),
    "qwen3-tp2-tied": (qwen("Qwen3ForCausalLM", tie_word_embeddings=True), [0, 1], 1),
    "qwen2-tp8-padded-head": (qwen(num_attention_heads=8), list(range(8)), 1),  # 8 does not divide 300: 320
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_worker_holds_fastdeploys_inference_tensors_bit_for_bit(tmp_path, case):
    doc, gpus, published_tp = CASES[case]
    state = canonical(doc, 1)
    publish(str(tmp_path / "snap"), "v1", state, published_tp)
    model_dir = model_dir_for(tmp_path / "fd", doc)
    record = stage_fastdeploy(str(tmp_path / "snap"), "v1", str(model_dir), gpus)
    assert record["state"] == "staged" and set(fd_parts(model_dir)) == set(record["files"])
    assert (model_dir / VERSION_FILE).read_text() == 'step: "v1"\n'
    double = FastDeployDouble(model_dir, gpus)  # loads at start and checks every parameter was filled
    want = fd_expected(hf_layout(state), doc, len(gpus))
    assert [digests(p) for p in double.params] == [digests(w) for w in want]


def test_a_version_that_does_not_fit_the_servers_model_is_refused_before_anything_changes(tmp_path):
    snap, doc = str(tmp_path / "snap"), qwen(num_hidden_layers=3)
    model_dir = model_dir_for(tmp_path / "fd", doc)
    publish(snap, "three", canonical(doc, 0))
    stage_fastdeploy(snap, "three", str(model_dir), [0])
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}

    publish(snap, "two", canonical(qwen(num_hidden_layers=2), 1))
    with pytest.raises(IncompatibleTargetError) as err:
        stage_fastdeploy(snap, "two", str(model_dir), [0])
    message = str(err.value)
    assert "missing model.layers.2." in message and "the version has 2 layers, the server's model 3" in message
    assert str(model_dir / "config.json") in message
    publish(snap, "wide", canonical(qwen(num_hidden_layers=3, intermediate_size=128), 2))
    with pytest.raises(IncompatibleTargetError, match=r"model.layers.0.mlp.gate_proj.weight \[64, 128\] \(expected "
                                                      r"\[64, 96\]\)"):
        stage_fastdeploy(snap, "wide", str(model_dir), [0])
    publish(snap, "half", canonical(qwen(num_hidden_layers=3, torch_dtype="bfloat16"), 3))
    with pytest.raises(IncompatibleTargetError, match="dtype BF16 where the server's model holds F32"):
        stage_fastdeploy(snap, "half", str(model_dir), [0])
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before

    llama = model_dir_for(tmp_path / "llama", qwen() | {"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(IncompatibleTargetError, match="no LlamaForCausalLMRL class"):
        stage_fastdeploy(snap, "three", str(llama), [0])
    assert sorted(p.name for p in llama.iterdir()) == ["config.json"]
    three = model_dir_for(tmp_path / "tp3", qwen(num_attention_heads=6, num_key_value_heads=3, hidden_size=48))
    with pytest.raises(IncompatibleTargetError, match="cannot split padded vocabulary 320 over 3 GPUs"):
        stage_fastdeploy(snap, "three", str(three), [0, 1, 2])


def test_staging_replaces_the_set_of_its_own_gpus_and_nothing_else(tmp_path):
    snap, doc = str(tmp_path / "snap"), qwen()
    model_dir = model_dir_for(tmp_path / "fd", doc)
    publish(snap, "v1", canonical(doc, 1), part_bytes=PART)
    publish(snap, "v2", canonical(doc, 2), part_bytes=4 * PART)
    (model_dir / "model_state.tp0.9.part1.pdparams").write_bytes(b"another worker's file")

    record = stage_fastdeploy(snap, "v1", str(model_dir), [4, 6])
    many = len([n for n in fd_parts(model_dir) if n.startswith("model_state.tp0.4.")])
    assert many > 2 and f"model_state.tp0.4.part{many}.pdparams" in record["files"]
    stage_fastdeploy(snap, "v2", str(model_dir), [4, 6])
    names = fd_parts(model_dir)
    assert len([n for n in names if n.startswith("model_state.tp0.4.")]) < many  # v1's extra parts are gone
    assert "model_state.tp0.9.part1.pdparams" in names
    double = FastDeployDouble(model_dir, [4, 6])
    want = fd_expected(hf_layout(canonical(doc, 2)), doc, 2)
    assert [digests(p) for p in double.params] == [digests(w) for w in want]

    publish(snap, "v3", canonical(doc, 3))
    data = bytearray((tmp_path / "snap" / "model_state.tp0.v3.part1.pdparams").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "snap" / "model_state.tp0.v3.part1.pdparams").write_bytes(bytes(data))
    before = {n: (model_dir / n).read_bytes() for n in fd_parts(model_dir)}
    with pytest.raises(TornSnapshotError, match=r"tp0\.v3\.part1.*xxh3_128"):
        stage_fastdeploy(snap, "v3", str(model_dir), [4, 6])
    assert {n: (model_dir / n).read_bytes() for n in fd_parts(model_dir)} == before  # v2 untouched
    assert read_record(str(model_dir), stage_record([4, 6]))["version"] == "v2"
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".baton-stage")]


def test_two_servers_sharing_a_model_dir_are_staged_apart(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    snap, doc = str(tmp_path / "snap"), qwen()
    model_dir = model_dir_for(tmp_path / "fd", doc)
    publish(snap, "v1", canonical(doc, 1))
    publish(snap, "v2", canonical(doc, 2), part_bytes=4 * PART)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: stage_fastdeploy(snap, job[0], str(model_dir), [job[1]]), [("v1", 0), ("v2", 1)]))
    for gpu, seed in ((0, 1), (1, 2)):
        assert read_record(str(model_dir), stage_record([gpu]))["version"] == f"v{seed}"
        double = FastDeployDouble(model_dir, [gpu])
        assert digests(double.params[0]) == digests(fd_expected(hf_layout(canonical(doc, seed)), doc, 1)[0])


# ---- over HTTP ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def held(url: str) -> list:
    return httpx.get(f"{url}/debug/weights", timeout=10).json()


@pytest.mark.parametrize("generation", ["v1", "legacy", "legacy-routed-to-v1"])
def test_each_api_generation_reloads_the_model_dir_through_its_snapshot_path(tmp_path, generation):
    snap, doc = str(tmp_path / "snap"), qwen()
    model_dir = model_dir_for(tmp_path / "fd", doc)
    for seed in (0, 1, 2):
        publish(snap, f"v{seed}", canonical(doc, seed))
    stage_fastdeploy(snap, "v0", str(model_dir), [0, 1])  # what the server starts from
    fd = FastDeployDouble(model_dir, [0, 1], "v1" if generation == "v1" else "legacy",
                          fd_enable_v1_update_weights=generation == "legacy-routed-to-v1")
    with in_process(fd.app()) as url:
        server = {"url": url, "kind": "fastdeploy", "model_dir": str(model_dir), "gpu_ids": [0, 1]}
        for seed in (1, 2):
            rows = sync_weights(f"v{seed}", snap, [server])
            assert rows[0]["status"] == "live" and rows[0]["bytes"] > 0
            assert held(url) == [digests(w) for w in fd_expected(hf_layout(canonical(doc, seed)), doc, 2)]
        if generation == "v1":
            assert fd.calls == ["sleep?tags=weight", "wakeup?tags=weight"] * 2  # never /v1/update_weights
            assert httpx.post(f"{url}/v1/pause").json()["status"] == "success"
            assert httpx.post(f"{url}/v1/update_weights", json={}).status_code == 500  # the rsync path: no snapshot
        else:
            assert fd.calls == ["clear_load_weight", "update_model_weight"] * 2
    assert read_record(str(model_dir), stage_record([0, 1]))["state"] == "live"


def test_a_version_that_does_not_fit_never_reaches_the_server(tmp_path):
    snap, doc = str(tmp_path / "snap"), qwen(num_hidden_layers=3)
    model_dir = model_dir_for(tmp_path / "fd", doc)
    publish(snap, "v0", canonical(doc, 0))
    publish(snap, "small", canonical(qwen(num_hidden_layers=2), 1))
    stage_fastdeploy(snap, "v0", str(model_dir), [0])
    fd = FastDeployDouble(model_dir, [0], "v1")
    with in_process(fd.app()) as url:
        weights = held(url)
        server = {"url": url, "kind": "fastdeploy", "model_dir": str(model_dir)}
        with pytest.raises(FleetSyncError, match="refused.*missing model.layers.2"):
            sync_weights("small", snap, [server])
        assert fd.calls == [] and held(url) == weights


def test_a_load_that_fails_half_way_is_restored_to_the_previous_version(tmp_path):
    snap, doc = str(tmp_path / "snap"), qwen()
    model_dir = model_dir_for(tmp_path / "fd", doc)
    for seed in (0, 1, 2):
        publish(snap, f"v{seed}", canonical(doc, seed))
    stage_fastdeploy(snap, "v0", str(model_dir), [0])
    fd = FastDeployDouble(model_dir, [0], "v1")
    with in_process(fd.app()) as url:
        server = {"url": url, "kind": "fastdeploy", "model_dir": str(model_dir)}
        sync_weights("v1", snap, [server])
        fd.fail_loads = update_server.retries + 1  # every try of v2 dies after one tensor: asleep and torn
        with pytest.raises(FleetSyncError, match="rolled back to v1"):
            sync_weights("v2", snap, [server])
        assert held(url) == [digests(fd_expected(hf_layout(canonical(doc, 1)), doc, 1)[0])]
        assert httpx.get(f"{url}/health").status_code == 200 and not fd.paused
    assert read_record(str(model_dir), stage_record([0]))["version"] == "v1"
    assert os.path.exists(model_dir / VERSION_FILE)


_STAGE_CHILD = """
import json, sys
from storage.fastdeploy import export_fastdeploy as stage_fastdeploy
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
snap, model_dir, warm = sys.argv[1:4]
stage_fastdeploy(snap, "warm", warm, [0, 1])  # imports and first-use costs, out of the way before measuring
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
stage_fastdeploy(snap, "big", model_dir, [0, 1])
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_staging_holds_about_one_part_in_memory(tmp_path):
    import subprocess
    import sys

    part = 8 << 20
    doc = qwen(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
               intermediate_size=1408, vocab_size=384)  # 97 MiB in float32, 13 parts
    snap = str(tmp_path / "snap")
    publish(snap, "big", canonical(doc, 0), part_bytes=part)
    publish(snap, "warm", canonical(doc, 1), part_bytes=part)
    for name in ("fd", "warm"):
        model_dir_for(tmp_path / name, doc)
    out = subprocess.run([sys.executable, "-c", _STAGE_CHILD, snap, str(tmp_path / "fd"), str(tmp_path / "warm")],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    delta = int(out.stdout.split()[-1])
    print(f"peak RSS delta {delta / (1 << 20):.1f} MiB")
    # the part being read, tensors waiting from the one before, and the buffer fused tensors are joined in
    assert delta <= 3 * part, f"peak RSS rose {delta >> 20} MiB staging a 97 MiB model in 8 MiB parts"
