"""Engine benchmark: output tokens/s of the `small` model at concurrency 1-64, through HTTP and in-process, against
HF `transformers` `generate` on the same architecture and the same weights in the same run, plus time to first
token and inter-token latency, and what batch invariance costs.

    python bench/engine_bench.py           # about 10 minutes; writes bench/results/engine.json
    python bench/engine_bench.py --quick   # a smoke run (tiny model, few requests)

Workload: seeded prompts of 16-128 tokens and outputs of 32-128 tokens (greedy, ``ignore_eos`` so every request
generates exactly its length). At concurrency C, C clients each send their next request when the previous one
ends (a closed loop); client i starts i/C of a mean single-stream request time late. Time to first token is that
of the steady state: the first C requests, sent while the clients start (faster than they arrive later, since a
request takes longer at C than alone), are reported apart as the burst. `transformers` serves the same requests
in static batches of C: prompts left-padded, every batch generating its longest output; its figure counts the
tokens the requests asked for (the padding work it does is reported too).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import log, machine_info, parser, results_path, write_results  # noqa: E402

CONCURRENCY = (1, 4, 16, 32, 64)


def workload(count: int, seed: int, quick: bool) -> list[tuple[str, int]]:
    """(prompt text, output tokens): the prompt encodes to 16-128 tokens (BOS + one byte a letter)."""
    rng = np.random.default_rng(seed)
    lo_p, hi_p, lo_o, hi_o = (16, 48, 8, 24) if quick else (16, 128, 32, 128)
    return [("".join(chr(c) for c in rng.integers(97, 123, int(rng.integers(lo_p, hi_p + 1)) - 1)),
             int(rng.integers(lo_o, hi_o + 1))) for _ in range(count)]


def requests_for(concurrency: int, quick: bool) -> int:
    return max(2 * concurrency, 4) if quick else max(3 * concurrency, 8)


def percentiles(values: list[float]) -> dict:
    a = np.asarray(values) if values else np.zeros(1)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


class Timings:
    """Per request: when it was sent, and when each of its tokens arrived."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows: list[tuple[float, list[float]]] = []

    def add(self, sent: float, arrivals: list[float]) -> None:
        with self.lock:
            self.rows.append((sent, arrivals))

    def summary(self, seconds: float, burst: int) -> dict:
        """Time to first token of the requests after the first ``burst`` (the clients' start-up, reported apart)."""
        tokens = sum(len(a) for _, a in self.rows)
        rows = sorted(self.rows)
        first, steady = rows[:burst], rows[burst:] or rows
        ttft = [a[0] - s for s, a in steady if a]
        itl = [b - a for _, arr in self.rows for a, b in zip(arr, arr[1:])]
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "ttft_s": percentiles(ttft), "itl_s": percentiles(itl),
                "burst_ttft_p99_s": percentiles([a[0] - s for s, a in first if a])["p99"]}


def closed_loop(send, jobs: list[tuple[str, int]], concurrency: int, stagger: float) -> dict:
    """``concurrency`` clients work through ``jobs``; ``send(prompt, max_tokens)`` returns token arrival times."""
    timings, lock, queue = Timings(), threading.Lock(), list(reversed(jobs))

    def client(i: int) -> None:
        time.sleep(stagger * i / concurrency)
        while True:
            with lock:
                if not queue:
                    return
                prompt, n = queue.pop()
            sent = time.perf_counter()
            timings.add(sent, send(prompt, n))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    return timings.summary(time.perf_counter() - start, concurrency)


def in_process_sender(engine):
    from infer.events import Finished, Token
    from infer.sampling import SamplingParams
    from infer.tokenizer import encode

    def send(prompt: str, n: int) -> list[float]:
        arrivals, done = [], threading.Event()

        def sink(event) -> None:
            if isinstance(event, Token):
                arrivals.append(time.perf_counter())
            elif isinstance(event, Finished):
                done.set()

        engine.submit([encode(prompt)], SamplingParams(max_tokens=n, ignore_eos=True), sink)
        done.wait()
        return arrivals

    return send


def http_sender(url: str):
    import httpx

    # TCP_NODELAY: without it the request body waits for a delayed ACK (about 40 ms per request here)
    nodelay = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                                  limits=httpx.Limits(max_connections=128))
    client = httpx.Client(timeout=600, transport=nodelay)

    def send(prompt: str, n: int) -> list[float]:
        arrivals = []
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
        with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("token_ids"):
                    arrivals.append(time.perf_counter())
        return arrivals

    return send


def hf_model(config, state: dict):
    """`transformers`' LlamaForCausalLM holding Baton's weights (Baton's Linear weights are [in, out])."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.eps, rope_theta=config.rope_theta,
        tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=258)).eval()
    mapped = {name: torch.from_numpy(value.T.copy() if value.ndim == 2 and "embed" not in name else value)
              for name, value in state.items()}  # the same names; Linear weights [out, in]
    missing = hf.load_state_dict(mapped, strict=True)
    assert not missing.missing_keys, missing
    return hf


def hf_throughput(hf, jobs: list[tuple[str, int]], batch: int) -> dict:
    import torch

    from infer.tokenizer import encode

    useful = done = 0
    start = time.perf_counter()
    for i in range(0, len(jobs), batch):
        group = jobs[i : i + batch]
        ids = [encode(p) for p, _ in group]
        width = max(map(len, ids))
        tokens = torch.tensor([[258] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        longest = max(n for _, n in group)
        with torch.no_grad():
            hf.generate(tokens, attention_mask=mask, max_new_tokens=longest, min_new_tokens=longest, do_sample=False)
        useful += sum(n for _, n in group)
        done += longest * len(group)
    seconds = time.perf_counter() - start
    return {"tokens": useful, "seconds": seconds, "tokens_per_s": useful / seconds,
            "computed_tokens_per_s": done / seconds}


def check_same_model(model, hf) -> float:
    """Largest logit difference between Baton and `transformers` on one prompt (float32 rounding only)."""
    import paddle
    import torch

    from infer.tokenizer import encode

    ids = encode("the same weights in both")
    with paddle.no_grad():
        ours = model(paddle.to_tensor([ids], dtype="int64")).numpy()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits.numpy()
    return float(np.abs(ours - theirs).max())


def main() -> int:
    args = parser(__doc__, "tiny model, few requests: checks the script, not the figures").parse_args()
    import torch

    import infer.model
    import storage
    from harness.launch import baton_serve
    from infer.config import get_config
    from infer.engine import Engine, EngineConfig
    from infer.generate import Fixed
    from infer.model import build_model, random_state_dict

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    logging.getLogger("httpx").setLevel(logging.WARNING)
    name = "tiny" if args.quick else "small"
    config = get_config(name)
    state = random_state_dict(config, 0)
    model = build_model(config, state)
    hf = hf_model(config, state)
    diff = check_same_model(model, hf)
    log(f"{name}: Baton vs transformers logits max |diff| {diff:.2e}")
    levels = (1, 4, 8) if args.quick else CONCURRENCY
    jobs = {c: workload(requests_for(c, args.quick), c, args.quick) for c in levels}
    mean_request_s = None
    rows = []
    engine = Engine(Fixed(model), config, EngineConfig(max_num_seqs=max(levels))).start()
    try:
        for c in levels:
            stagger = 0.0 if mean_request_s is None else mean_request_s
            r = closed_loop(in_process_sender(engine), jobs[c], c, stagger)
            if c == 1:
                mean_request_s = r["seconds"] / len(jobs[c])
            rows.append({"concurrency": c, "path": "in-process", **r})
            log(f"in-process c={c}: {r['tokens_per_s']:.0f} tok/s, TTFT p99 {r['ttft_s']['p99']:.3f}s")
        invariance = {}
        for c in (1, 32) if not args.quick else (1, 4):
            runs = {True: [], False: []}
            for _ in range(1 if args.quick else 3):  # alternated, medians: this machine's timing noise is ~15%
                for on in (True, False):
                    infer.model.BATCH_INVARIANT = on
                    runs[on].append(closed_loop(in_process_sender(engine), jobs[c], c, mean_request_s)["tokens_per_s"])
            infer.model.BATCH_INVARIANT = True
            for on in runs:
                invariance[f"c{c}_{'on' if on else 'off'}"] = float(np.median(runs[on]))
            log(f"batch invariance at c={c}: {invariance[f'c{c}_on']:.0f} vs {invariance[f'c{c}_off']:.0f} tok/s")
    finally:
        engine.stop()
    with tempfile.TemporaryDirectory() as root:
        storage.publish(state, root, "v1")
        with baton_serve(root, "--model", name, "--version", "v1", "--max-num-seqs", str(max(levels)),
                         timeout=300) as url:
            send = http_sender(str(url))
            send("warm up", 4)
            for c in levels:
                r = closed_loop(send, jobs[c], c, mean_request_s)
                rows.append({"concurrency": c, "path": "http", **r})
                log(f"http c={c}: {r['tokens_per_s']:.0f} tok/s, TTFT p99 {r['ttft_s']['p99']:.3f}s")
    hf_rows = []
    for c in levels:
        r = hf_throughput(hf, jobs[c], c)
        hf_rows.append({"batch": c, **r})
        log(f"transformers batch {c}: {r['tokens_per_s']:.0f} tok/s ({r['computed_tokens_per_s']:.0f} computed)")
    doc = summarize(rows, hf_rows, invariance, diff, name, levels)
    doc["machine"] = machine_info()
    print_table(doc)
    write_results(results_path(args, "engine"), doc)
    return 0


def summarize(rows: list[dict], hf_rows: list[dict], invariance: dict, diff: float, name: str, levels) -> dict:
    by = {(r["path"], r["concurrency"]): r for r in rows}
    hf = {r["batch"]: r for r in hf_rows}
    big = 32 if 32 in levels else max(levels)
    ratio = lambda path, c: by[(path, c)]["tokens_per_s"]  # noqa: E731
    targets = [
        (f"in-process, {big} concurrent vs single-stream tokens/s", ratio("in-process", big) / ratio("in-process", 1),
         ">=", 6.0),
        (f"HTTP, {big} concurrent vs single-stream tokens/s", ratio("http", big) / ratio("http", 1), ">=", 6.0),
        (f"in-process, {big} concurrent vs transformers batch {big}",
         ratio("in-process", big) / hf[big]["tokens_per_s"], ">=", 1.2),
        (f"HTTP, {big} concurrent vs transformers batch {big}",
         ratio("http", big) / hf[big]["tokens_per_s"], ">=", 1.2),
        (f"HTTP TTFT p99, {big} concurrent / single-stream", by[("http", big)]["ttft_s"]["p99"]
         / by[("http", 1)]["ttft_s"]["p99"], "<=", 3.0),
        (f"HTTP TTFT p99 of the first {big} requests (start-up burst) / single-stream",
         by[("http", big)]["burst_ttft_p99_s"] / by[("http", 1)]["ttft_s"]["p99"], "<=", 3.0),
    ]
    for key in [k for k in invariance if k.endswith("_on")]:
        c = key[1:-3]
        targets.append((f"batch invariance cost at {c} concurrent (1 - on/off tokens/s)",
                        1 - invariance[key] / invariance[f"c{c}_off"], "<=", 0.10))
    targets = [{"measure": m, "value": v, "target": f"{op} {t:g}", "met": v >= t if op == ">=" else v <= t}
               for m, v, op, t in targets]
    return {"model": name, "workload": "prompts 16-128 tokens, outputs 32-128 tokens, greedy, ignore_eos",
            "logit_max_abs_diff_vs_transformers": diff, "rows": rows, "transformers": hf_rows,
            "batch_invariance_tokens_per_s": invariance, "targets": targets}


def print_table(doc: dict) -> None:
    hf = {r["batch"]: r for r in doc["transformers"]}
    print(f"\n{'path':<11}{'conc':>5}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'ITL p99':>9}"
          f"{'burst TTFT p99':>16}{'HF tok/s':>10}")
    for r in doc["rows"]:
        h = hf.get(r["concurrency"])
        print(f"{r['path']:<11}{r['concurrency']:>5}{r['tokens_per_s']:>9.0f}{r['ttft_s']['p50']:>10.3f}"
              f"{r['ttft_s']['p99']:>10.3f}{r['itl_s']['p50']:>9.3f}{r['itl_s']['p99']:>9.3f}"
              f"{r['burst_ttft_p99_s']:>16.3f}{h['tokens_per_s'] if h else 0:>10.0f}")
    print()
    for t in doc["targets"]:
        print(f"  {t['measure']}: {t['value']:.2f} (target {t['target']}: {'met' if t['met'] else 'MISSED'})")


if __name__ == "__main__":
    sys.exit(main())
