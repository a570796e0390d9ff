"""``baton demo``: a small but real RL loop whose policy improves only if weights flow trainer -> Prefect ->
storage -> inference server.

The task has a programmatic reward a small model learns in minutes on a CPU: answer any prompt with digits. The
reward is the fraction of the ``max_tokens`` answer tokens that are digits (bytes with the built-in sizes'
byte tokenizer; with ``--model-dir``, the tokens of that model's own tokenizer). Each step:

1. rollouts: a group of samples per prompt from the inference servers over ``/v1/completions`` (the servers are
   the only thing that generates), each stamped with the weight version that produced it;
2. the trainer (Paddle, the same decoder) scores the sampled tokens and takes a policy-gradient step with
   group-mean baselines (GRPO-style advantages, REINFORCE loss);
3. the trainer saves its checkpoint and the ``sync-weights`` flow publishes it as parts, every server loads and
   confirms it. With ``delta``, the servers serve bf16 and the trainer publishes its bf16 copy of the float32
   master weights itself, as a delta on the step before (only the bf16 elements the step changed); the flow then
   flips the servers to it.

In ``--async`` mode the next rollouts run while the sync is still in flight, so they may come from the previous
version (staleness at most 1); the loss then weights each token by truncated importance sampling, the trainer's
probability over the server's (its returned logprob), capped at ``TIS_CAP``. Each step records the train/infer
mismatch: the largest difference between the logprob the server returned for a token and the one the trainer's
forward computes for it with the same weights (0.0 when the two are bit-identical, as they are on CPU).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import storage
from flows.local import use_temporary_prefect
from infer.tokenizer import BYTES, Tokenizer

PROMPTS = ("Digits: ", "Answer with numbers: ", "Count for me: ", "Your PIN is ")
DELTA_DTYPE = "bfloat16"  # what ``--delta`` serves: the bf16 copy of float32 master weights, as RL trainers publish
TIS_CAP = 2.0  # truncated importance sampling: a token's weight is min(p_trainer / p_server, TIS_CAP)


def reward(token_ids: list[int], max_tokens: int, tokenizer: Tokenizer = BYTES) -> float:
    """Fraction of the answer's token budget filled with digit tokens (stopping early earns nothing more)."""
    return sum(tokenizer.token_bytes(t).strip().isdigit() for t in token_ids) / max_tokens


@dataclass
class Rollout:
    prompt: str
    token_ids: list[int]  # the answer's tokens, ending with EOS when the policy chose to stop
    version: str
    reward: float
    logprobs: list[float]  # the server's logprob of each answer token (EOS has none: the trainer's own is used)


@dataclass
class StepRecord:
    step: int
    version: str  # what the trainer published after this step
    reward_mean: float
    rollout_versions: list[str]
    staleness_max: int
    publish_s: float
    sync_s: float
    bytes: int  # what each server read to take the version
    kind: str  # "full" or "delta" ("" for the last step, which publishes nothing)
    published_bytes: int  # what the publish wrote: a delta's changed elements, or the whole version
    full_bytes: int  # what a full version holds: the yardstick of published_bytes
    note: str  # why a step asked to publish a delta was published in full
    train_s: float
    mismatch: float | None  # max |server - trainer| logprob over tokens sampled with the trainer's weights
    is_ratio: float  # mean importance ratio p_trainer / p_server over the step's tokens (1.0 on-policy)
    machine: dict  # the trainer's CPU fingerprint (kernels.fingerprint): what bit-identical rows rest on
    parity: str  # whether every server's fingerprint matches it, so that a zero mismatch means what it says


class Trainer:
    """The learner: the policy's weights, an optimiser, and the policy-gradient step. The weights train in float32
    (master weights, as mixed-precision trainers keep them: a bf16 weight would not move at a small learning rate)
    and go out in the model directory's dtype (``state``)."""

    def __init__(self, model_name: str, seed: int, lr: float, model_dir: str | None = None,
                 served_dtype: str | None = None):
        import paddle

        import kernels
        from infer.config import get_config
        from infer.model import build_model, trainable
        from infer.tokenizer import HFTokenizer

        kernels.use_every_core()  # the trainer's GEMMs too
        paddle.seed(seed)
        if model_dir:  # the directory's architecture, weights and tokenizer
            from infer.hf import load_model_dir, read_config

            self.served_dtype = read_config(model_dir).dtype
            self.model = trainable(load_model_dir(model_dir, dtype="float32"))
            self.config, self.tokenizer = self.model.config, HFTokenizer.from_dir(model_dir)
        else:
            self.config, self.tokenizer = get_config(model_name), BYTES
            self.model = trainable(build_model(self.config, seed=seed))
            self.served_dtype = self.config.dtype
        self.served_dtype = served_dtype or self.served_dtype
        self.optimizer = paddle.optimizer.Adam(learning_rate=lr, parameters=self.model.parameters())

    def step(self, rollouts: list[Rollout], group: int, version: str, tis: bool) -> tuple[float | None, float]:
        """One update: advantage = reward minus its prompt group's mean; loss = -advantage * log p(answer), each
        token weighted by its truncated importance ratio when ``tis``. Returns the train/infer mismatch over the
        rollouts of ``version`` (the trainer's current weights) and the mean importance ratio."""
        import paddle

        from infer.model import token_logprobs

        rewards = np.array([r.reward for r in rollouts]).reshape(-1, group)
        advantages = (rewards - rewards.mean(axis=1, keepdims=True)).reshape(-1)
        losses, mismatch, ratios = [], [], []
        for r, adv in zip(rollouts, advantages):
            if not r.token_ids:
                continue
            prompt = self.tokenizer.encode(r.prompt)  # as the server encodes it, special tokens added
            logits = self.model(paddle.to_tensor([prompt + r.token_ids], dtype="int64"))[0, len(prompt) - 1 : -1]
            logp = token_logprobs(logits, paddle.to_tensor(r.token_ids, dtype="int64"))  # each answer token
            mine = logp.numpy()
            served = np.array(r.logprobs + list(mine[len(r.logprobs):]), np.float32)  # EOS: the trainer's own
            ratio = np.exp(mine - served)
            ratios.extend(ratio.tolist())
            if r.version == version:
                mismatch.append(float(np.abs(mine - served).max()))
            if adv == 0:
                continue
            weight = paddle.to_tensor(np.minimum(ratio, TIS_CAP) if tis else np.ones_like(ratio))
            losses.append(-float(adv) * (weight * logp).sum())
        if losses:
            loss = paddle.add_n(losses) / len(rollouts)
            loss.backward()
            self.optimizer.step()
            self.optimizer.clear_grad()
        return (max(mismatch) if mismatch else None), float(np.mean(ratios)) if ratios else 1.0

    def state(self) -> dict:
        """The weights as the servers take them: the master weights cast to the served dtype."""
        params = self.model.state_dict()
        if self.served_dtype == "float32":
            return {k: v.detach() for k, v in params.items()}
        return {k: v.detach().astype(self.served_dtype) for k, v in params.items()}

    def save(self, directory: Path) -> str:
        """The checkpoint a Paddle trainer writes: one ``paddle.save`` state dict, then the completion marker."""
        import paddle

        directory.mkdir(parents=True, exist_ok=True)
        paddle.save(self.state(), str(directory / "model_state.pdparams"))
        (directory / "COMPLETE").write_text("")
        return str(directory)


def rollouts(http, servers: list[str], prompts: tuple[str, ...], group: int, max_tokens: int, seed: int,
             tokenizer: Tokenizer = BYTES) -> list[Rollout]:
    """``group`` samples per prompt, spread over the servers; each records the version that produced it. A sample
    the policy ended is scored with the tokenizer's (first) stop token appended, so stopping is learnt too."""
    jobs = [(p, g) for p in prompts for g in range(group)]
    eos = min(tokenizer.stop_ids)

    def one(job_index: int) -> Rollout:
        prompt, g = jobs[job_index]
        url = servers[job_index % len(servers)]
        r = http.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                                                     "seed": seed * 100_003 + job_index, "logprobs": 0})
        r.raise_for_status()
        body = r.json()
        choice = body["choices"][0]
        ids = choice["token_ids"]
        if choice["finish_reason"] == "stop":  # no stop strings are sent: "stop" means the policy sampled EOS
            ids = ids + [eos]
        return Rollout(prompt, ids, body["weight_version"], reward(ids, max_tokens, tokenizer),
                       choice["logprobs"]["token_logprobs"])

    with ThreadPoolExecutor(min(8, len(jobs))) as pool:
        return list(pool.map(one, range(len(jobs))))


def run(run_dir: Path, steps: int = 12, model: str = "tiny", storage_url: str | None = None, servers: int = 1,
        async_mode: bool = False, group: int = 8, max_tokens: int = 12, lr: float = 3e-3, seed: int = 0,
        progress: bool = True, model_dir: str | None = None, delta: bool = False) -> list[StepRecord]:
    """The loop; one record per step. Step ``s`` samples with whatever the servers serve (``step_s``, or in async
    mode possibly ``step_{s-1}`` while ``step_s`` is still syncing: staleness at most 1), then trains and
    publishes ``step_{s+1}``. The last step only samples, to measure the final policy. ``model_dir``: a Hugging
    Face directory the trainer starts from and the servers take architecture and tokenizer from. ``delta``: the
    servers serve ``DELTA_DTYPE`` and the trainer publishes its copy of that dtype straight from memory, each step as
    a delta on the one before where it pays (the servers then read only what changed); a step published in full
    says why."""
    use_temporary_prefect(run_dir / "prefect")  # the flow records stay with the run
    import contextlib
    import logging

    import httpx
    from tqdm import tqdm

    from flows.sync import sync_weights
    from harness.launch import baton_serve

    logging.getLogger("httpx").setLevel(logging.WARNING)
    snapshots = storage_url or str(run_dir / "snapshots")
    trainer = Trainer(model, seed, lr, model_dir, served_dtype=DELTA_DTYPE if delta else None)
    model_args = ("--model-dir", model_dir) if model_dir else ("--model", model)
    model_args += ("--dtype", DELTA_DTYPE) if delta else ()
    syncs: dict[str, dict] = {}
    last_published = storage.LastPublished()  # the delta's base compared in memory, not read back

    def publish_and_sync(version: str, source: str | dict, urls: list[str]) -> None:
        """``source``: the checkpoint directory the flow publishes, or (``delta``) the state the trainer publishes."""
        start = time.perf_counter()
        if not delta:
            rows = sync_weights(version, snapshots, urls, source=source, part_bytes=64 << 20)
            published = {"publish_s": rows[0]["publish_work_s"], "kind": "full", "published_bytes": rows[0]["bytes"],
                         "full_bytes": rows[0]["bytes"], "note": ""}
        else:
            report = publish_step(source, snapshots, version, last_published)
            if report.note:
                tqdm.write(f"{version} published in full, not as a delta: {report.note}")
            rows = sync_weights(version, snapshots, urls)
            published = {"publish_s": report.seconds, "kind": report.kind, "published_bytes": report.bytes,
                         "full_bytes": report.full_bytes, "note": report.note}
        syncs[version] = published | {"sync_s": time.perf_counter() - start, "bytes": rows[0]["bytes"]}

    def checkpoint(version: str) -> str | dict:
        """What ``publish_and_sync`` takes, made now: the next step trains on while it is published."""
        return trainer.state() if delta else trainer.save(run_dir / "trainer" / version)

    samples: list[tuple[list[Rollout], float, float | None, float]] = []
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(baton_serve(snapshots, *model_args, ready=False, timeout=300)).url
                for _ in range(servers)]
        http = stack.enter_context(httpx.Client(timeout=120))
        # the initial policy first, so the servers generate with the trainer's weights from the start
        publish_and_sync("step_0", checkpoint("step_0"), urls)
        in_flight: threading.Thread | None = None
        bar = tqdm(range(steps + 1), desc="rl steps", unit="step", disable=not progress)
        for step in bar:
            batch = rollouts(http, urls, PROMPTS, group, max_tokens, seed * 1000 + step, trainer.tokenizer)
            bar.set_postfix(reward=f"{np.mean([r.reward for r in batch]):.3f}")
            if step == steps:
                samples.append((batch, 0.0, None, 1.0, *parity(http, urls)))
                break
            start = time.perf_counter()
            mismatch, ratio = trainer.step(batch, group, f"step_{step}", tis=async_mode)
            samples.append((batch, time.perf_counter() - start, mismatch, ratio, *parity(http, urls)))
            if in_flight is not None:
                in_flight.join()  # at most one sync in flight: the staleness bound of 1
            version = f"step_{step + 1}"
            in_flight = threading.Thread(target=publish_and_sync, args=(version, checkpoint(version), urls))
            in_flight.start()
            if not async_mode:
                in_flight.join()
                in_flight = None
        if in_flight is not None:
            in_flight.join()
    records = []
    for step, (batch, train_s, mismatch, ratio, machine, same) in enumerate(samples):
        published = f"step_{step + 1}" if step < steps else ""
        sync = syncs.get(published, {"publish_s": 0.0, "sync_s": 0.0, "bytes": 0, "kind": "",
                                     "published_bytes": 0, "full_bytes": 0, "note": ""})
        records.append(StepRecord(step, published, float(np.mean([r.reward for r in batch])),
                                  sorted({r.version for r in batch}),
                                  max(step - _version_number(r.version) for r in batch), sync["publish_s"],
                                  sync["sync_s"], sync["bytes"], sync["kind"], sync["published_bytes"],
                                  sync["full_bytes"], sync["note"], train_s, mismatch, ratio, machine, same))
    unknown = {v for rec in records for v in rec.rollout_versions} - set(syncs)
    if unknown:
        raise AssertionError(f"rollouts reported versions that were never published: {sorted(unknown)}")
    return records


def publish_step(state: dict, snapshots: str, version: str, last: storage.LastPublished) -> storage.PublishReport:
    """``state`` published as ``version``: a delta on the version before it (``step_0`` has none), or in full where
    a delta would not pay; ``last`` holds what was published before, so the base is compared in memory."""
    base = f"step_{_version_number(version) - 1}" if version != "step_0" else None
    return storage.publish(state, snapshots, version, part_bytes=64 << 20, base=base, cache=last)


def parity(http, urls: list[str]) -> tuple[dict, str]:
    """The trainer's CPU fingerprint, and whether every server's (``GET /v1/weights``) matches it: train/infer
    parity is bit-identical only between processes that compute a row alike, and is not claimed otherwise."""
    import kernels

    mine = kernels.fingerprint()
    theirs = [http.get(f"{url}/v1/weights", timeout=30).json().get("machine") or {} for url in urls]
    if all(kernels.same_machine(mine, t) for t in theirs):
        return mine, "same machine fingerprint"
    return mine, "fingerprints differ: train/infer parity not claimed"


def _version_number(version: str) -> int:
    return int(version.rsplit("_", 1)[1])


def table(records: list[StepRecord]) -> str:
    lines = [f"{'step':>4}  {'rollouts from':<16}{'staleness':>9}{'reward':>8}{'mismatch':>10}{'IS ratio':>9}"
             f"{'published':>11}{'kind':>7}{'bytes':>10}{'of full':>9}{'publish s':>10}{'sync s':>8}{'read':>10}"]
    for r in records:
        mismatch = "-" if r.mismatch is None else f"{r.mismatch:.1e}"
        share = f"{r.published_bytes / r.full_bytes:.1%}" if r.full_bytes else "-"
        lines.append(f"{r.step:>4}  {','.join(r.rollout_versions):<16}{r.staleness_max:>9}{r.reward_mean:>8.3f}"
                     f"{mismatch:>10}{r.is_ratio:>9.3f}{r.version:>11}{r.kind:>7}{r.published_bytes:>10}{share:>9}"
                     f"{r.publish_s:>10.2f}{r.sync_s:>8.2f}{r.bytes:>10}")
    return "\n".join(lines)


def plot(records: list[StepRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r.reward_mean for r in records], marker="o", color="tab:blue", label="reward (mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward", color="tab:blue")
    right = ax.twinx()
    synced = [r for r in records if r.version]  # the last step samples only: nothing to sync
    right.plot([r.step for r in synced], [r.sync_s for r in synced], marker="s", color="tab:orange")
    right.set_ylim(bottom=0)
    right.set_ylabel("sync seconds", color="tab:orange")
    ax.set_title("Baton RL demo: reward and weight-sync latency per step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(records: list[StepRecord], run_dir: Path) -> None:
    (run_dir / "steps.json").write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
    plot(records, run_dir / "reward.png")
