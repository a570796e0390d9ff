"""Publishing Hugging Face directories: ``storage.hf_tensors`` (and ``baton publish`` over it) reads a checkpoint
written by ``transformers`` (sharded, with an index) or PaddleFormers tensor by tensor, reshards it to the serving
degree, and the snapshot loads back as the same canonical state the server reads from the directory itself."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import save_file

import storage
from infer.config import get_config
from infer.model import random_state_dict
from storage.hfdir import GIVES_HIDDEN, TAKES_HIDDEN
from storage.tp import merge_state_dicts
from tests.test_cli import REPO, baton

PART = 64 << 10


def hf_layout(state: dict) -> dict[str, np.ndarray]:
    """A canonical state (``[in, out]``) as ``transformers`` saves it: Linear weights and the head ``[out, in]``."""
    out = {}
    for name, value in state.items():
        value = np.asarray(value)
        flip = value.ndim == 2 and (TAKES_HIDDEN.search(name) or GIVES_HIDDEN.search(name) or name == "lm_head.weight")
        out[name] = np.ascontiguousarray(value.T) if flip else value
    return out


def write_hf_dir(path, state: dict, shard_bytes: int | None = None, fmt: str = "pt") -> str:
    """``state`` (canonical) saved as a Hugging Face directory: one ``model.safetensors``, or shards of about
    ``shard_bytes`` and their index."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    tensors = hf_layout(state)
    if shard_bytes is None:
        save_file(tensors, path / "model.safetensors", metadata={"format": fmt})
        return str(path)
    shards: list[dict] = [{}]
    for name, value in tensors.items():
        if shards[-1] and sum(v.nbytes for v in shards[-1].values()) + value.nbytes > shard_bytes:
            shards.append({})
        shards[-1][name] = value
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": fmt})
        weight_map.update(dict.fromkeys(shard, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return str(path)


def loaded(root: str, version: str, tp_size: int) -> dict:
    shards = [storage.load_snapshot(root, version, rank=r).state_dict for r in range(tp_size)]
    return merge_state_dicts([{k: v.numpy() for k, v in s.items()} for s in shards])


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], np.asarray(value), err_msg=name)


@pytest.fixture(scope="module")
def state():
    return random_state_dict(get_config("tiny"), seed=7)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_a_sharded_transformers_directory_publishes_resharded_and_loads_back_canonical(tmp_path, state, tp_size):
    source = write_hf_dir(tmp_path / "hf", state, shard_bytes=200 << 10)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    root = str(tmp_path / "snap")
    for rank in range(tp_size):
        shard = storage.hf_tensors(source, rank=rank, tp_size=tp_size)
        assert all(isinstance(v, storage.TensorRef) for v in shard.values())  # nothing read yet
        storage.publish(shard, root, "v1", rank, part_bytes=PART)
    assert_same(loaded(root, "v1", tp_size), state)


def test_a_paddleformers_directory_publishes_the_same(tmp_path, state):
    """PaddleFormers: ``[in, out]`` already and the backbone named after the family; the head stays
    ``[vocab, hidden]`` as Hugging Face writes it."""
    hf = hf_layout(state)
    pf = {("llama." + k.removeprefix("model.")): (np.asarray(state[k]) if (TAKES_HIDDEN.search(k) or
                                                                            GIVES_HIDDEN.search(k)) else v)
          for k, v in hf.items()}
    source = tmp_path / "pf"
    source.mkdir()
    (source / "config.json").write_text("{}")
    save_file({k.replace("llama.lm_head", "lm_head"): v for k, v in pf.items()}, source / "model.safetensors",
              metadata={"format": "np"})
    storage.publish(storage.hf_tensors(str(source)), str(tmp_path / "snap"), "v1", part_bytes=PART)
    assert_same(loaded(str(tmp_path / "snap"), "v1", 1), state)


def test_the_server_s_reader_and_the_publisher_agree(tmp_path):
    """``infer.hf`` (checked against config.json) and ``storage.hf_tensors`` (shapes only) give the same tensors
    for a real ``transformers`` checkpoint with q/k/v biases."""
    transformers = pytest.importorskip("transformers")
    from infer.hf import read_model_dir

    config = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=300)
    model = transformers.Qwen2ForCausalLM._from_config(config, attn_implementation="eager")
    model.save_pretrained(tmp_path / "qwen2", safe_serialization=True, max_shard_size="100KB")
    _, weights = read_model_dir(str(tmp_path / "qwen2"))
    refs = storage.hf_tensors(str(tmp_path / "qwen2"))
    assert_same({k: v.read() for k, v in refs.items()}, {k: v.numpy() for k, v in weights.items()})


def test_baton_publish_takes_a_hugging_face_directory(tmp_path, state):
    source = write_hf_dir(tmp_path / "hf", state)
    root = str(tmp_path / "snap")
    out = baton("publish", source, "--to", root, "--version", "v2", "--tp-size", "2", "--part-size", "64KiB")
    assert out.returncode == 0, out.stderr
    assert "published v2 rank 0" in out.stdout and "published v2 rank 1" in out.stdout
    assert_same(loaded(root, "v2", 2), state)


def test_a_directory_mixing_layouts_is_refused_naming_tensors(tmp_path, state):
    hf = hf_layout(state)
    name = next(k for k in hf if TAKES_HIDDEN.search(k) and hf[k].shape[0] != hf[k].shape[1])
    hf[name] = np.ascontiguousarray(hf[name].T)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{}")
    save_file(hf, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(ValueError, match="mix layouts"):
        storage.hf_tensors(str(tmp_path / "bad"))


def test_publishing_holds_about_one_part_not_the_model(tmp_path):
    """A 288 MiB checkpoint published in 16 MiB parts: the publisher's peak RSS grows by a few parts at most."""
    rng = np.random.default_rng(0)
    hidden, inter = 1024, 4096
    state = {"model.embed_tokens.weight": rng.standard_normal((8192, hidden), np.float32)}
    for i in range(4):
        for p, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                         ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                         ("mlp.gate_proj", (hidden, inter)), ("mlp.up_proj", (hidden, inter)),
                         ("mlp.down_proj", (inter, hidden))):
            state[f"model.layers.{i}.{p}.weight"] = rng.standard_normal(shape, np.float32)
    total = sum(v.nbytes for v in state.values())
    source = write_hf_dir(tmp_path / "big", state, shard_bytes=100 << 20)
    del state
    script = textwrap.dedent(f"""
        import numpy as np
        import storage
        from storage.digest import sum64
        sum64(np.zeros(4, np.uint16))  # the compiled sum64 loads once per process: a fixed cost, not the model's
        def kib(field):
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))
        before = kib("VmRSS:")
        refs = storage.hf_tensors({source!r})
        storage.publish(refs, {str(tmp_path / "snap")!r}, "big", part_bytes=16 << 20, durable=False)
        print((kib("VmHWM:") - before) * 1024)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    growth = int(done.stdout.split()[-1])
    print(f"peak RSS +{growth >> 20} MiB publishing {total >> 20} MiB")
    assert growth < 96 << 20, f"peak RSS grew {growth >> 20} MiB publishing {total >> 20} MiB"
