"""Hugging Face checkpoints of the five supported families, served by Baton and checked against ``transformers``
itself (torch, CPU, float32, eager attention): logits within 1e-4 of the largest logit, and the same 32 greedy
tokens through Baton's engine as ``generate(do_sample=False)``. Plus sharded, ``memory://`` and PaddleFormers
copies, and the errors a bad ``config.json`` or weight file gets."""

import copy
import json

import fsspec
import numpy as np
import paddle
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from infer.generate import SamplingParams, complete  # noqa: E402
from infer.hf import config_from_hf, load_model_dir, read_model_dir  # noqa: E402
from infer.model import build_model  # noqa: E402
from storage.tp import merge_state_dicts, split_state_dict  # noqa: E402

RTOL = 1e-4  # of the largest |logit|; measured: 0.5e-6 to 1.5e-6 (float32)
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
             vocab_size=300, max_position_embeddings=128, initializer_range=0.15,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)  # no EOS: every generation runs 32 tokens
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}  # a short original context, so all three frequency bands occur
FAMILIES = {  # what each family adds to the common sizes
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters={"rope_theta": 10000.0, **LLAMA3})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1e6)),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32)),  # q/k norms, head_dim != hidden / heads
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4096)),
    "ernie": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),  # interleaved
}
PROMPT = [5, 17, 299, 42, 7, 100, 3, 250]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family as ``transformers`` builds it at random, saved with safetensors: {family: (dir, model)}."""
    torch.manual_seed(0)
    out = {}
    for family, (config_cls, model_cls, extra) in FAMILIES.items():
        config = getattr(transformers, config_cls)(**SIZES, **extra)
        model = getattr(transformers, model_cls)._from_config(config, attn_implementation="eager").eval()
        with torch.no_grad():  # norms and biases start at 1 and 0: move them, so a misplaced one shows
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.2)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path, safe_serialization=True)
        out[family] = (path, model)
    return out


def assert_same_state(a, b):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name].numpy(), b[name].numpy(), err_msg=name)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_and_greedy_tokens_match_transformers(saved, family):
    path, hf = saved[family]
    model = load_model_dir(str(path))
    ids = torch.tensor([PROMPT * 4])
    with torch.no_grad():
        want = hf(ids).logits[0].numpy()
    got = model(paddle.to_tensor(ids.numpy()))[0].numpy()
    diff = float(np.abs(got - want).max())
    print(f"{family}: max |logit difference| {diff:.2e}, relative {diff / np.abs(want).max():.2e}")
    assert diff <= RTOL * np.abs(want).max()

    with torch.no_grad():
        hf_tokens = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=32, min_new_tokens=32)
    ours = complete(model, PROMPT, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)).tokens
    assert ours == hf_tokens[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_published_and_reloaded_the_model_is_bit_identical(saved, family, tmp_path):
    """``storage.hf_tensors`` -> ``publish`` (two ranks) -> ``load_snapshot`` into a fresh serving model gives the
    weights ``load_model_dir`` reads, bit for bit, hence the same logits and greedy tokens as above."""
    import storage
    from infer.model import Decoder

    path, _ = saved[family]
    direct = load_model_dir(str(path))
    for rank in range(2):
        storage.publish(storage.hf_tensors(str(path), rank=rank, tp_size=2), str(tmp_path), "v1", rank,
                        part_bytes=32 << 10)
    model = Decoder(direct.config)
    for rank in range(2):
        storage.load_snapshot(str(tmp_path), "v1", rank=rank, into=storage.shard_views(model.state_dict(), rank, 2))
    assert_same_state(model.state_dict(), direct.state_dict())


def test_features_reach_the_config(saved):
    configs = {family: read_model_dir(str(path))[0] for family, (path, _) in saved.items()}
    assert configs["llama"].rope_scaling.factor == 8.0 and configs["qwen2"].rope_theta == 1e6
    assert configs["qwen2"].attention_bias and not configs["qwen2"].o_bias
    assert configs["qwen3"].qk_norm and configs["qwen3"].head_dim == 32
    assert configs["ernie"].rope_interleaved and configs["ernie"].tie_embeddings
    assert all(c.vocab_size == 300 and c.max_seq_len == 128 and not c.byte_vocab for c in configs.values())


def test_sharded_and_remote_copies_load_the_same(saved, tmp_path):
    path, hf = saved["qwen2"]
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and not (tmp_path / "model.safetensors").exists()
    whole = load_model_dir(str(path)).state_dict()
    assert_same_state(load_model_dir(str(tmp_path)).state_dict(), whole)
    memory = fsspec.filesystem("memory")
    try:
        memory.put(str(path), "/hf/qwen2", recursive=True)
        assert_same_state(load_model_dir("memory://hf/qwen2").state_dict(), whole)
    finally:
        memory.rm("/hf", recursive=True)


def test_bfloat16_checkpoint_keeps_its_bits(saved, tmp_path):
    _, hf = saved["qwen3"]
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    model = load_model_dir(str(tmp_path))
    assert model.config.dtype == "bfloat16"
    name = "model.layers.1.self_attn.k_proj.weight"
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        want = f.get_tensor(name).T.contiguous().view(torch.int16).numpy()
    np.testing.assert_array_equal(model.state_dict()[name].view(paddle.int16).numpy(), want)


def paddleformers_copy(src, dst, prefix: str, head_transposed: bool):
    """``src`` as PaddleFormers saves it: Linear weights [in, out], the backbone named ``prefix``."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = {}
    for name, value in load_file(src / "model.safetensors").items():
        if value.ndim == 2 and "embed_tokens" not in name and (name != "lm_head.weight" or head_transposed):
            value = np.ascontiguousarray(value.T)
        state[prefix + name.removeprefix("model.") if name.startswith("model.") else name] = value
    save_file(state, dst / "model.safetensors", metadata={"format": "np"})


@pytest.mark.parametrize("family,prefix,head_transposed", [("qwen2", "qwen2.", True), ("llama", "model.", False),
                                                             ("ernie", "ernie.", True)])
def test_paddleformers_layout_loads_the_same(saved, tmp_path, family, prefix, head_transposed):
    path, _ = saved[family]
    paddleformers_copy(path, tmp_path / "pf", prefix, head_transposed)
    assert_same_state(load_model_dir(str(tmp_path / "pf")).state_dict(), load_model_dir(str(path)).state_dict())


def test_bias_and_norm_tensors_split_across_ranks(saved):
    state = {n: t.numpy() for n, t in load_model_dir(str(saved["qwen2"][0])).state_dict().items()}
    state |= {n: t.numpy() for n, t in load_model_dir(str(saved["qwen3"][0])).state_dict().items()
              if "q_norm" in n or "k_norm" in n}
    shards = split_state_dict(state, 2)
    bias = "model.layers.0.self_attn.k_proj.bias"
    assert shards[1][bias].shape == (16,) and shards[1]["model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    x = np.ones((1, 64), np.float32)
    w = "model.layers.0.self_attn.k_proj.weight"
    full = x @ state[w] + state[bias]
    np.testing.assert_allclose(np.concatenate([x @ s[w] + s[bias] for s in shards], 1), full, rtol=1e-6)
    assert all(np.array_equal(merge_state_dicts(shards)[n], state[n]) for n in state)


def test_every_feature_keeps_batch_invariance_and_train_infer_parity():
    """Biases, q/k norms, interleaved and Llama 3 rotary, tied head, head_dim != hidden / heads: a request's
    tokens and logprobs are the same bits alone or among 15 others, and equal the trainer's full forward."""
    from infer.config import RopeScaling, get_config
    from infer.generate import generate
    from infer.model import token_logprobs

    config = get_config("tiny", head_dim=32, attention_bias=True, o_bias=True, mlp_bias=True, qk_norm=True,
                        rope_interleaved=True, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16), tie_embeddings=True)
    model = build_model(config, seed=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, int(rng.integers(1, 40))).tolist() for _ in range(16)]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=5, logprobs=0)
    together = generate(model, prompts, params)
    for prompt, batched in zip(prompts, together):
        alone = complete(model, prompt, params)
        assert batched.tokens == alone.tokens
        served = np.array([lp.logprob for lp in batched.logprobs], np.float32)
        assert served.tolist() == [lp.logprob for lp in alone.logprobs]
        with paddle.no_grad():
            logits = model(paddle.to_tensor([prompt + batched.tokens]))[0, len(prompt) - 1 : -1]
            trainer = token_logprobs(logits, paddle.to_tensor(batched.tokens)).numpy()
        np.testing.assert_array_equal(served, trainer)


# ---- what is refused, and how ------------------------------------------------------------------------------


def config_doc(saved, family="llama", **changes):
    doc = json.loads((saved[family][0] / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


@pytest.mark.parametrize("changes,message", [
    (dict(architectures=["GPT2LMHeadModel"]), "architectures 'GPT2LMHeadModel' is not supported"),
    (dict(hidden_size=None), "missing field 'hidden_size'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
     "rope_parameters: rope_type 'yarn' is not supported"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "dynamic", "factor": 2.0}),
     "rope_scaling: rope_type 'dynamic' is not supported"),
    (dict(rope_parameters={**LLAMA3, "factor": None}), "missing field 'rope_parameters.factor'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(num_key_value_heads=3), "kv_heads"),
])
def test_bad_config_names_the_field_and_the_file(saved, changes, message):
    with pytest.raises(ValueError, match="config.json") as info:
        config_from_hf(config_doc(saved, **changes))
    assert message in str(info.value)


def test_dtype_and_context_follow_the_file_unless_given(saved):
    doc = config_doc(saved, dtype="bfloat16")
    assert config_from_hf(doc).dtype == "bfloat16" and config_from_hf(doc, dtype="float32").dtype == "float32"
    assert config_from_hf(config_doc(saved, dtype=None, torch_dtype="float16")).dtype == "float16"
    assert config_from_hf(doc, max_seq_len=64).max_seq_len == 64


def test_a_sliding_window_shorter_than_the_context_is_refused(saved):
    doc = config_doc(saved, "mistral", sliding_window=32)
    with pytest.raises(ValueError, match=r"sliding_window 32 is shorter than the context 128.*max_seq_len=32"):
        config_from_hf(doc)
    assert config_from_hf(doc, max_seq_len=32).max_seq_len == 32
    qwen = config_doc(saved, "qwen2", sliding_window=32)  # set, but no layer uses it
    assert config_from_hf(qwen).max_seq_len == 128
    with pytest.raises(ValueError, match="sliding_window 32"):
        config_from_hf({**qwen, "layer_types": ["full_attention", "sliding_attention"]})


def test_wrong_weight_shape_names_the_tensor_and_both_shapes(saved, tmp_path):
    path, _ = saved["mistral"]
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    state = load_file(path / "model.safetensors")
    state["model.layers.1.self_attn.k_proj.weight"] = np.zeros((24, 64), np.float32)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \[24, 64\], "
                                         r"expected \[64, 32\] \(\[in, out\]\) or \[32, 64\]"):
        read_model_dir(str(tmp_path))
    del state["model.norm.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensor 'model.norm.weight'"):
        read_model_dir(str(tmp_path))


def test_a_directory_without_weights_says_what_it_found(saved, tmp_path):
    (tmp_path / "config.json").write_text((saved["llama"][0] / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors weights are read"):
        read_model_dir(str(tmp_path))


def test_byte_vocab_minimum_holds_only_for_the_named_configs(saved):
    from infer.config import get_config

    with pytest.raises(ValueError, match="vocab_size 200"):
        get_config("tiny", vocab_size=200)
    doc = config_doc(saved, vocab_size=200)
    assert config_from_hf(doc).vocab_size == 200
    assert build_model(config_from_hf(doc)).model.embed_tokens.weight.shape == [200, 64]
