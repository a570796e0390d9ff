"""The decoder: shapes, decoding equal to recomputation, sampling, tensor-parallel layout, and loading snapshots."""

import numpy as np
import paddle
import pytest

import kernels
import storage
from infer import tokenizer
from infer.config import CONFIGS, get_config
from infer.generate import SamplingParams, complete, sample
from infer.model import build_model, random_state_dict
from storage.tp import merge_state_dicts, reshard, split_axis, split_state_dict

PROMPT = tokenizer.encode("Hello, baton!")


@pytest.fixture(scope="module")
def tiny():
    return build_model(get_config("tiny"), seed=1)


def logits_of(model, ids):
    return model(paddle.to_tensor([ids], dtype="int64"))[0].numpy()


def greedy_without_cache(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(logits_of(model, ids)[-1])))
    return ids[len(prompt):]


def test_named_sizes():
    assert CONFIGS["tiny"].num_parameters() < 1_000_000
    assert 10_000_000 <= CONFIGS["small"].num_parameters() < 100_000_000
    assert 0.9e9 <= CONFIGS["1b"].num_parameters() <= 1.2e9
    model = build_model(get_config("tiny"))
    assert sum(int(np.prod(p.shape)) for p in model.state_dict().values()) == CONFIGS["tiny"].num_parameters()


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="kv_heads"):
        get_config("tiny", kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        get_config("tiny", dtype="int8")
    with pytest.raises(ValueError, match="unknown model 'huge'"):
        get_config("huge")


def test_tokenizer_round_trips_any_text():
    text = "héllo → 世界\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode("a")[0] == tokenizer.BOS


def test_logits_shape_and_batch_rows_are_independent(tiny):
    a, b = tokenizer.encode("abcdef"), tokenizer.encode("uvwxyz")
    both = tiny(paddle.to_tensor([a, b], dtype="int64")).numpy()
    assert both.shape == (2, 7, 384) and both.dtype == np.float32
    np.testing.assert_array_equal(both[1], logits_of(tiny, b))  # bit-identical: the forward is batch-invariant


def test_cached_decoding_equals_uncached_recomputation(tiny):
    greedy = complete(tiny, PROMPT, SamplingParams(max_tokens=12)).tokens
    assert len(greedy) == 12 and greedy == greedy_without_cache(tiny, PROMPT, len(greedy))


def test_bfloat16_weights_decode_like_their_own_recomputation():
    model = build_model(get_config("tiny", dtype="bfloat16"), seed=1)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == paddle.bfloat16
    greedy = complete(model, PROMPT, SamplingParams(max_tokens=8)).tokens
    assert greedy == greedy_without_cache(model, PROMPT, len(greedy))


def test_sampling_is_reproducible_with_a_seed(tiny):
    params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    first = complete(tiny, PROMPT, params).tokens
    assert first == complete(tiny, PROMPT, params).tokens
    others = {tuple(complete(tiny, PROMPT, SamplingParams(max_tokens=20, temperature=1.0, seed=s)).tokens)
              for s in range(5)}
    assert len(others) > 1


def test_top_p_keeps_only_the_smallest_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(0)
    drawn = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), rng) for _ in range(200)}
    assert drawn == {0, 1}
    assert sample(logits, SamplingParams(), rng) == 0


def test_completion_stops_at_stop_strings_and_reports_why(tiny):
    full = complete(tiny, PROMPT, SamplingParams(max_tokens=10))
    assert full.finish_reason == "length" and len(full.tokens) == 10
    stop = full.text[3:5]
    cut = complete(tiny, PROMPT, SamplingParams(max_tokens=10, stop=(stop,)))
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]
    with pytest.raises(ValueError, match="no room in the context"):
        complete(tiny, [1] * 300, SamplingParams())


# ---- tensor-parallel layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_split_then_merge_is_exact(tp_size):
    state = random_state_dict(get_config("tiny"), seed=3)
    shards = split_state_dict(state, tp_size)
    assert all(set(s) == set(state) for s in shards)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert shards[0][q].shape == (64, 64 // tp_size)
    assert shards[-1]["model.layers.1.mlp.down_proj.weight"].shape == (176 // tp_size, 64)
    merged = merge_state_dicts(shards)
    assert set(merged) == set(state)
    for name in state:
        np.testing.assert_array_equal(merged[name], state[name])


@pytest.mark.parametrize("src,dst", [(2, 1), (1, 2), (4, 2), (2, 4)])
def test_reshard_between_degrees(src, dst):
    state = random_state_dict(get_config("tiny"), seed=4)
    out = reshard(split_state_dict(state, src), dst)
    want = split_state_dict(state, dst)
    assert len(out) == dst
    for got, exp in zip(out, want):
        for name in exp:
            np.testing.assert_array_equal(got[name], exp[name])


def test_shards_compute_what_the_full_layer_computes():
    """Column-parallel outputs concatenate, row-parallel partial products sum: the axes are the right ones."""
    state = random_state_dict(get_config("tiny"), seed=5)
    shards = split_state_dict(state, 2)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    up = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_allclose(np.concatenate([x @ s[up] for s in shards], axis=1), x @ state[up], rtol=1e-5)
    down = "model.layers.0.mlp.down_proj.weight"
    h = np.random.default_rng(1).standard_normal((3, 176)).astype(np.float32)
    parts = sum(h[:, r * 88 : (r + 1) * 88] @ s[down] for r, s in enumerate(shards))
    np.testing.assert_allclose(parts, h @ state[down], rtol=1e-4, atol=1e-5)


def test_split_works_on_paddle_tensors_and_rejects_bad_layouts():
    state = {k: paddle.to_tensor(v) for k, v in random_state_dict(get_config("tiny"), seed=6).items()}
    merged = merge_state_dicts(split_state_dict(state, 2))
    np.testing.assert_array_equal(merged["lm_head.weight"].numpy(), state["lm_head.weight"].numpy())
    with pytest.raises(ValueError, match="do not divide"):
        split_state_dict(state, 5)
    with pytest.raises(ValueError, match="no tensor-parallel rule"):
        split_axis("model.layers.0.self_attn.rotary_emb.inv_freq")
    shards = split_state_dict(random_state_dict(get_config("tiny"), seed=6), 2)
    shards[1]["model.norm.weight"] = shards[1]["model.norm.weight"] * 2
    with pytest.raises(ValueError, match="differs between rank 0 and rank 1"):
        merge_state_dicts(shards)


# ---- loading snapshots into the model ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_a_snapshot_equals_loading_the_state_dict(tmp_path, dtype):
    config = get_config("tiny", dtype=dtype)
    new_state = random_state_dict(config, seed=2)
    storage.publish(new_state, str(tmp_path), "v2", part_bytes=64 * 1024)
    served = build_model(config, seed=1)
    before = logits_of(served, PROMPT)
    report = storage.load_snapshot(str(tmp_path), "v2", into=served.state_dict(), cast=dtype != "float32",
                                   copy_fn=kernels.cast_copy_)
    assert len(report.files) > 1
    after = logits_of(served, PROMPT)
    assert not np.allclose(after, before)
    np.testing.assert_array_equal(after, logits_of(build_model(config, new_state), PROMPT))


def test_each_rank_file_holds_its_shard(tmp_path):
    state = random_state_dict(get_config("tiny"), seed=8)
    shards = split_state_dict(state, 2)
    for rank, shard in enumerate(shards):
        storage.publish(shard, str(tmp_path), "v1", rank=rank)
    loaded = [storage.load_snapshot(str(tmp_path), "v1", rank=r).state_dict for r in range(2)]
    merged = merge_state_dicts([{k: v.numpy() for k, v in s.items()} for s in loaded])
    for name in state:
        np.testing.assert_array_equal(merged[name], state[name])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_rank_loads_into_its_slice_of_one_model(tmp_path, dtype):
    """A whole tensor-parallel group in one process: rank files land in views of the full parameters."""
    from storage.tp import shard_views

    config = get_config("tiny", dtype=dtype)
    state = random_state_dict(config, seed=9)
    for rank, shard in enumerate(split_state_dict(state, 2)):
        storage.publish(shard, str(tmp_path), "v1", rank=rank, part_bytes=32 * 1024)
    model = build_model(config, seed=1)
    for rank in range(2):
        storage.load_snapshot(str(tmp_path), "v1", rank=rank, into=shard_views(model.state_dict(), rank, 2),
                              cast=dtype != "float32", copy_fn=kernels.cast_copy_)
    np.testing.assert_array_equal(logits_of(model, PROMPT), logits_of(build_model(config, state), PROMPT))


def test_training_forward_matches_inference_and_learns():
    """The trainer's differentiable forward computes the served logits, and a gradient step moves them."""
    from infer.model import trainable

    config = get_config("tiny")
    model = trainable(build_model(config, seed=1))
    ids = paddle.to_tensor([PROMPT], dtype="int64")
    with paddle.no_grad():
        served = model(ids).numpy()
    logits = model(ids)
    np.testing.assert_array_equal(logits.numpy(), served)
    target = paddle.to_tensor([[ord("7")] * len(PROMPT)], dtype="int64")
    loss = paddle.nn.functional.cross_entropy(logits.reshape([-1, config.vocab_size]), target.reshape([-1]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt = paddle.optimizer.SGD(learning_rate=0.5, parameters=model.parameters())
    opt.step()
    with paddle.no_grad():
        after = paddle.nn.functional.cross_entropy(model(ids).reshape([-1, config.vocab_size]), target.reshape([-1]))
    assert float(after) < float(loss)
