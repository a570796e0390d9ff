"""The README's main job, run as a user runs it: short fixed-seed RL loops."""

import json
import subprocess
import sys


def demo(run, *args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "baton_cli", "demo", "--dir", str(run), *args],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(run / "snapshots") not in processes  # the servers it started are gone
    return json.loads((run / "steps.json").read_text())


def published(run) -> set[str]:
    return {p.name.split(".")[2] for p in (run / "snapshots").glob("model_state.tp0.*.manifest.json")}


def test_the_policy_improves_as_weights_flow_to_two_servers(tmp_path):
    steps = demo(tmp_path / "sync", "--steps", "6", "--servers", "2")
    assert steps[-1]["reward_mean"] > 2 * steps[0]["reward_mean"]
    assert published(tmp_path / "sync") == {f"step_{i}" for i in range(7)}
    assert [s["rollout_versions"] for s in steps] == [[f"step_{i}"] for i in range(7)]  # on-policy
    # the servers' logprobs are the trainer's own, bit for bit: no train/infer mismatch, importance ratio 1
    assert [s["mismatch"] for s in steps[:-1]] == [0.0] * 6 and all(s["is_ratio"] == 1.0 for s in steps)
    # ... which is claimed because trainer and servers compute rows alike: one BLAS build, core type, thresholds
    assert all(s["parity"] == "same machine fingerprint" and s["machine"]["row_thresholds"] for s in steps)
    assert (tmp_path / "sync" / "reward.png").stat().st_size > 1000


def test_async_rollouts_stay_within_one_version_and_name_published_ones(tmp_path):
    steps = demo(tmp_path / "async", "--steps", "3", "--async")
    assert all(set(s["rollout_versions"]) <= published(tmp_path / "async") for s in steps)
    assert all(s["staleness_max"] <= 1 for s in steps)
    assert all(s["mismatch"] in (None, 0.0) for s in steps)  # same weights, same bits, even in async mode


def test_a_real_family_learns_through_its_own_tokenizer(tmp_path):
    """``--model-dir`` at an empty path: a tiny random Qwen2 with a BPE tokenizer trained on the spot, served by
    ``baton serve --model-dir`` and trained from the same directory."""
    model_dir = tmp_path / "qwen2-tiny"
    steps = demo(tmp_path / "hf", "--steps", "6", "--model-dir", str(model_dir))
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and (model_dir / "tokenizer.json").exists()
    assert steps[-1]["reward_mean"] > 1.5 * steps[0]["reward_mean"]
    assert [s["mismatch"] for s in steps[:-1]] == [0.0] * 6


def test_delta_publishes_the_bf16_copy_as_deltas(tmp_path):
    """``--delta``: the servers serve bf16 and the trainer publishes its bf16 copy of the float32 master weights;
    at the demo's step size most steps are deltas, each a fraction of a full version, on the step before."""
    steps = demo(tmp_path / "delta", "--steps", "3", "--delta")
    manifests = {p.name.split(".")[2]: json.loads(p.read_text())
                 for p in (tmp_path / "delta" / "snapshots").glob("model_state.tp0.*.manifest.json")}
    assert manifests["step_0"].get("kind") is None
    assert {t["dtype"] for t in manifests["step_0"]["tensors"].values()} == {"BF16"}
    published = steps[:-1]  # the last step samples only
    deltas = [s for s in published if s["kind"] == "delta"]
    assert len(deltas) >= len(published) / 2, [(s["kind"], s["note"]) for s in published]
    for s in deltas:
        assert manifests[s["version"]]["base"]["version"] == f"step_{s['step']}"
        assert 0 < s["published_bytes"] == s["bytes"] < s["full_bytes"] / 2  # the server read only the delta
    assert all(s["note"] for s in published if s["kind"] == "full")  # a fall back to full says why
    # the servers sample from the bf16 copy: near the trainer's float32 logprobs, not equal
    assert all(0 < s["mismatch"] < 0.2 for s in published)
