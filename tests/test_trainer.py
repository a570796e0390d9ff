"""Trainer checkpoints as Paddle's trainers write them: tensor- and pipeline-parallel files, fused projections,
unified checkpoints. Each checkpoint is built here in numpy from a canonical state (the trainers' file names, the
split per rank and the fused orders written in this file from PaddleNLP / PaddleFormers, never by Baton's code),
published through ``baton publish``, ``publish-checkpoint`` and ``sync-weights(source=...)``, and the published
tensors are compared bit for bit with the canonical state."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import paddle
import pytest
from prefect.testing.utilities import prefect_test_harness
from safetensors.numpy import save_file

import storage
from flows.publish import publish_checkpoint
from flows.sync import sync_weights
from harness.launch import baton_serve
from infer.hf import config_from_hf
from infer.model import parameter_shapes
from tests.test_cli import baton
from tests.test_publish_hf import write_hf_dir
from tests.test_tokenizer import qwen_style

PART = 32 << 10
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 96, "vocab_size": 384,
         "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "torch_dtype": "float32",
         "tie_word_embeddings": False}
QWEN2_TIED = LLAMA | {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True}


def canonical(doc: dict, seed: int, bf16: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in parameter_shapes(config_from_hf(doc)).items():
        value = rng.standard_normal(shape, dtype=np.float32)
        out[name] = (value.view(np.uint32) >> 16).astype(np.uint16) if bf16 else value
    return out


def rank_slice(x: np.ndarray, axis: int, r: int, tp: int) -> np.ndarray:
    n = x.shape[axis] // tp
    return np.ascontiguousarray(np.take(x, range(r * n, (r + 1) * n), axis=axis))


def trainer_rank(state: dict, doc: dict, r: int, tp: int, fused: bool, prefix: str, ffn: str) -> dict:
    """Rank r's tensors as the trainer holds them: PaddleNLP's tensor-parallel mappings (columns for q/k/v/gate/up
    and their biases, rows for o/down and the embedding, columns of the [hidden, vocab] LM head), fused per rank
    as llama/modeling.py reshapes them: per kv head [its q heads | k | v]; gate then up."""
    g, d = doc["num_attention_heads"] // doc["num_key_value_heads"], doc["hidden_size"] // doc["num_attention_heads"]
    out = {}
    for name, x in state.items():
        plain = prefix + name[len("model."):] if name.startswith("model.") else name
        if name == "lm_head.weight" or any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
            out[plain] = rank_slice(x, x.ndim - 1, r, tp)
        elif any(k in name for k in ("o_proj.weight", "down_proj.weight", "embed_tokens")):
            out[plain] = rank_slice(x, 0, r, tp)
        else:
            out[plain] = x
    if fused:
        for i in range(doc["num_hidden_layers"]):
            layer = f"{prefix}layers.{i}."
            for kind in ("weight", "bias"):
                q, k, v = (out.pop(f"{layer}self_attn.{x}_proj.{kind}", None) for x in "qkv")
                if q is None:
                    continue
                lead = q.shape[:-1]
                kvl = k.shape[-1] // d
                blocks = [q.reshape(*lead, kvl, g, d), k.reshape(*lead, kvl, 1, d), v.reshape(*lead, kvl, 1, d)]
                out[f"{layer}self_attn.qkv_proj.{kind}"] = np.concatenate(blocks, axis=-2).reshape(*lead, -1)
            gate, up = out.pop(f"{layer}mlp.gate_proj.weight"), out.pop(f"{layer}mlp.up_proj.weight")
            out[f"{layer}mlp.{ffn}.weight"] = np.concatenate([gate, up], axis=-1)
    return out


def stage_of(name: str, doc: dict, p: int, pp: int) -> bool:
    """Which pipeline stage holds a tensor (LlamaForCausalLMPipe: the embedding first, layers in equal runs, the
    norm and the LM head last)."""
    per = doc["num_hidden_layers"] // pp
    if ".layers." in name:
        return int(name.split(".layers.")[1].split(".")[0]) // per == p
    return p == (0 if "embed_tokens" in name else pp - 1)


def write_trainer_checkpoint(path: Path, state: dict, doc: dict, tp: int, pp: int, fused: bool = False,
                             prefix: str = "llama.", ffn: str = "gate_up_fused_proj", fmt: str = "pickle",
                             bf16: bool = False) -> str:
    """``model_state[.tpNN][_ppNN].pdparams`` (or ``model[...].safetensors``) per rank, plus the trainer's other
    files, as ``Trainer._save`` leaves them; a tied head's copy ``[vocab, hidden]`` on the last stage."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(doc | {"tensor_parallel_degree": 1}))
    for name in ("optimizer.tp00.pdopt", "scheduler.pdparams", "trainer_state.json", "rng_state_4.pth"):
        (path / name).write_bytes(b"not weights")
    for r in range(tp):
        ranked = trainer_rank(state, doc, r, tp, fused, prefix, ffn)
        for p in range(pp):
            stage = {n: x for n, x in ranked.items() if stage_of(n, doc, p, pp)}
            if doc["tie_word_embeddings"] and p == pp - 1:
                stage["lm_head.weight"] = rank_slice(state["model.embed_tokens.weight"], 0, r, tp)
            suffix = "_".join(s for s, on in ((f"tp{r:02d}", tp > 1), (f"pp{p:02d}", pp > 1)) if on)
            if fmt == "safetensors":
                save_file(stage, path / f"model{'.' + suffix if suffix else ''}.safetensors", {"format": "paddle"})
                continue
            tensors = {n: paddle.to_tensor(x.view(np.int16)).view(paddle.bfloat16) if bf16 else paddle.to_tensor(x)
                       for n, x in stage.items()}
            paddle.save(tensors, str(path / f"model_state{'.' + suffix if suffix else ''}.pdparams"))
    return str(path)


def write_unified(path: Path, state: dict, doc: dict) -> str:
    """A unified checkpoint: tensors merged over the ranks, fused (PaddleFormers' ``model.`` names and
    ``up_gate_proj``), spread over ``model-0000K-of-0000N.safetensors`` with their index."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(doc))
    tensors = trainer_rank(state, doc, 0, 1, True, "model.", "up_gate_proj")
    names = list(tensors)
    files = {f"model-0000{k + 1}-of-00002.safetensors": names[k::2] for k in range(2)}
    for file, subset in files.items():
        save_file({n: tensors[n] for n in subset}, path / file, {"format": "np"})
    weight_map = {n: f for f, subset in files.items() for n in subset}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(path)


def published(root: str, version: str, rank: int = 0) -> dict[str, np.ndarray]:
    """What a served rank of ``version`` holds, read back as raw bits by Baton's loader."""
    state = storage.load_snapshot(root, version, rank=rank).state_dict
    return {n: np.asarray(t.numpy()).view(np.uint16) if t.dtype == paddle.bfloat16 else t.numpy()
            for n, t in state.items()}


def expected(state: dict, doc: dict, rank: int, tp: int) -> dict[str, np.ndarray]:
    """Serving rank ``rank`` of ``tp`` (the split Baton serves: columns of q/k/v/gate/up and the head, rows of
    o/down and the embedding); a tied model has no head."""
    out = {}
    for name, x in state.items():
        if tp == 1:
            out[name] = x
        elif name == "lm_head.weight" or any(k in name for k in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                                                 "up_proj")):
            out[name] = rank_slice(x, x.ndim - 1, rank, tp)
        elif any(k in name for k in ("o_proj.weight", "down_proj.weight", "embed_tokens")):
            out[name] = rank_slice(x, 0, rank, tp)
        else:
            out[name] = x
    return out


def assert_bits(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype.itemsize == want[name].dtype.itemsize and got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


CASES = {  # name: (config, trainer tp, pp, fused, prefix, ffn name, file format, bf16, serving tp)
    "tp2-pp2-fused": (LLAMA, 2, 2, True, "llama.", "gate_up_fused_proj", "pickle", False, 1),
    "tp2-pp2-unfused-to-tp2": (LLAMA, 2, 2, False, "llama.", "", "pickle", False, 2),
    "pp2-only": (LLAMA, 1, 2, False, "llama.", "", "pickle", False, 1),
    "tp2-fused-bf16": (LLAMA | {"torch_dtype": "bfloat16"}, 2, 1, True, "llama.", "gate_up_fused_proj", "pickle",
                       True, 1),
    "tp4-pp2-safetensors-to-tp2": (LLAMA, 4, 2, False, "llama.", "", "safetensors", False, 2),
    "qwen2-tied-fused-bias-paddleformers": (QWEN2_TIED, 2, 2, True, "model.", "up_gate_proj", "pickle", False, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_baton_publish_reads_what_the_trainers_write_bit_for_bit(tmp_path, case):
    doc, tp, pp, fused, prefix, ffn, fmt, bf16, serving = CASES[case]
    state = canonical(doc, 3, bf16)
    src = write_trainer_checkpoint(tmp_path / "checkpoint-30", state, doc, tp, pp, fused, prefix, ffn, fmt, bf16)
    root = str(tmp_path / "snap")
    out = baton("publish", src, "--to", root, "--version", "step-30", "--tp-size", str(serving), "--part-size", "32KiB")
    assert out.returncode == 0, out.stderr
    for r in range(serving):
        assert_bits(published(root, "step-30", r), expected(state, doc, r, serving))


def test_sharding_stage1_files_are_joined_by_sharding_rank(tmp_path):
    """``save_sharded_model``: each sharding rank's file holds whole tensors, those it owns (sharding_io.py)."""
    state = canonical(LLAMA, 11)
    src = Path(write_trainer_checkpoint(tmp_path / "ckpt", state, LLAMA, 2, 1))
    for r in range(2):
        whole = paddle.load(str(src / f"model_state.tp{r:02d}.pdparams"))
        (src / f"model_state.tp{r:02d}.pdparams").unlink()
        names = sorted(whole)
        for shard in range(3):
            file = src / f"model_state.tp{r:02d}_shard{shard:02d}.pdparams"
            paddle.save({n: whole[n] for n in names[shard::3]}, str(file))
    storage.publish(storage.checkpoint_tensors(str(src)), str(tmp_path / "snap"), "s", part_bytes=PART)
    assert_bits(published(str(tmp_path / "snap"), "s"), expected(state, LLAMA, 0, 1))
    (src / "model_state.tp01_shard02.pdparams").unlink()
    with pytest.raises(ValueError, match=r"sharding rank\(s\) \[2\] of tensor rank 1, pipeline stage 0 missing"):
        storage.checkpoint_tensors(str(src))


def test_a_unified_checkpoint_with_fused_projections_publishes_canonical(tmp_path):
    state = canonical(LLAMA, 4)
    src = write_unified(tmp_path / "uc", state, LLAMA)
    storage.publish(storage.checkpoint_tensors(src, rank=1, tp_size=2), str(tmp_path / "snap"), "uc", 1,
                    part_bytes=PART)
    assert_bits(published(str(tmp_path / "snap"), "uc", 1), expected(state, LLAMA, 1, 2))


def test_what_does_not_add_up_is_refused_before_anything_is_written(tmp_path):
    state, root = canonical(LLAMA, 5), tmp_path / "snap"

    def refused(src: str, *match: str) -> None:
        out = baton("publish", src, "--to", str(root), "--version", "v")
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        for m in match:
            assert m in out.stderr, out.stderr
        assert not root.exists() or not any(root.iterdir())

    src = Path(write_trainer_checkpoint(tmp_path / "a", state, LLAMA, 2, 2, fused=True))
    (src / "model_state.tp01_pp01.pdparams").unlink()
    refused(str(src), "tensor rank(s) [1] of pipeline stage 1 missing")
    (src / "model_state.tp00_pp01.pdparams").unlink()
    refused(str(src), "only pipeline stage 0 is here, yet its files are named ppNN")

    src = Path(write_trainer_checkpoint(tmp_path / "b", state, LLAMA, 2, 2))
    (src / "model_state.tp01_pp01.pdparams").rename(src / "model_state.tp02_pp01.pdparams")
    refused(str(src), "tensor rank(s) [2] of pipeline stage 0 missing (the checkpoint has 3 tensor ranks)")
    (src / "model_state.tp02_pp01.pdparams").unlink()
    (src / "model_state.tp00_pp01.pdparams").rename(src / "model_state.pp01.pdparams")  # stage 1 saved without TP
    refused(str(src), "model_state.tp00_pp00.pdparams names a tp rank and model_state.pp01.pdparams does not")

    src = Path(write_trainer_checkpoint(tmp_path / "c", state, LLAMA, 2, 1, fused=True))
    (src / "config.json").write_text(json.dumps(LLAMA | {"num_key_value_heads": 2}))  # not this model's config
    refused(str(src), "model_state.tp00.pdparams", "qkv_proj", "does not fit 2 kv heads")

    src = Path(write_trainer_checkpoint(tmp_path / "d", state, LLAMA, 1, 2))
    (src / "model_state.pp00.pdparams").rename(src / "model_state.pp00_shard00.pdparams")
    (src / "model_state.pp01.pdparams").rename(src / "model_state.pp01_shard00.pdparams")
    drop = paddle.load(str(src / "model_state.pp01_shard00.pdparams"))  # a bf16 run leaves trainable weights out
    paddle.save({n: t for n, t in drop.items() if "mlp" not in n}, str(src / "model_state.pp01_shard00.pdparams"))
    refused(str(src), "missing model.layers.2.mlp.gate_proj.weight", "master weights", "unified_checkpoint")

    src = Path(write_trainer_checkpoint(tmp_path / "e", state, LLAMA | {"num_hidden_layers": 4}, 1, 2))
    (src / "config.json").write_text(json.dumps(LLAMA | {"num_hidden_layers": 5}))
    refused(str(src), "missing model.layers.4.")


_PUBLISH_CHILD = """
import sys, storage
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
src, root, part = sys.argv[1], sys.argv[2], int(sys.argv[3])
storage.publish(storage.checkpoint_tensors(src), root, "warm", part_bytes=part)  # imports and first-use costs
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
storage.publish(storage.checkpoint_tensors(src), root, "big", part_bytes=part)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_a_pickle_checkpoint_is_published_without_holding_it(tmp_path):
    import subprocess
    import sys

    part = 8 << 20
    doc = LLAMA | {"hidden_size": 512, "num_hidden_layers": 8, "intermediate_size": 1408}  # 97 MiB in float32
    src = write_trainer_checkpoint(tmp_path / "ckpt", canonical(doc, 6), doc, 2, 2, fused=True)
    out = subprocess.run([sys.executable, "-c", _PUBLISH_CHILD, src, str(tmp_path / "snap"), str(part)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    delta = int(out.stdout.split()[-1])
    print(f"peak RSS delta {delta / (1 << 20):.1f} MiB")
    # a part being written, the tensor being joined from its ranks, the fused tensors it came out of
    assert delta <= 3 * part, f"peak RSS rose {delta >> 20} MiB publishing a 97 MiB checkpoint in 8 MiB parts"


# ---- through the flows, and served ----------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_publish_checkpoint_merges_stages_and_ranks(tmp_path):
    state = canonical(LLAMA, 7)
    src = write_trainer_checkpoint(tmp_path / "ckpt", state, LLAMA, 2, 2, fused=True)
    rows = publish_checkpoint(src, str(tmp_path / "snap"), "v7", part_bytes=PART, tp_size=2)
    assert [r["rank"] for r in rows] == [0, 1]
    for r in range(2):
        assert_bits(published(str(tmp_path / "snap"), "v7", r), expected(state, LLAMA, r, 2))


def completion(url: str) -> list[int]:
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "The policy gradient", "max_tokens": 12,
                                                   "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_a_synced_trainer_checkpoint_serves_the_tokens_of_its_weights(tmp_path):
    state = canonical(QWEN2_TIED, 8)
    src = write_trainer_checkpoint(tmp_path / "ckpt", state, QWEN2_TIED, 2, 2, True, "model.", "up_gate_proj")
    direct = write_hf_dir(tmp_path / "direct", state)  # the same weights, as a Hugging Face directory
    (tmp_path / "direct" / "config.json").write_text(json.dumps(QWEN2_TIED))
    qwen_style(Path(direct))
    other = write_hf_dir(tmp_path / "other", canonical(QWEN2_TIED, 9))
    (tmp_path / "other" / "config.json").write_text(json.dumps(QWEN2_TIED))
    qwen_style(Path(other))
    snap = str(tmp_path / "snap")
    with baton_serve(None, "--model-dir", direct) as reference:
        want = completion(str(reference))
    with baton_serve(snap, "--model-dir", other) as url:
        before = completion(str(url))
        rows = sync_weights("step-8", snap, [str(url)], source=src, part_bytes=PART)
        assert rows[0]["status"] == "live"
        assert completion(str(url)) == want != before
