"""Real-family benchmark: a Qwen2-architecture model of Qwen2.5-0.5B's shape with random weights, saved by
`transformers` (safetensors), in float32 and bfloat16. Load time into a serving model, Baton (from a published
snapshot, and from the directory itself) against `transformers.from_pretrained` of the same files; decode tokens/s
at concurrency 1 and 32, Baton's engine against `transformers.generate` on the same weights, in the same run.

    python bench/hf_bench.py           # about 10 minutes; writes bench/results/hf.json
    python bench/hf_bench.py --quick   # a smoke run (a small Qwen2, few tokens)

Decode: every request has a 16-token prompt and generates exactly ``--new-tokens`` tokens greedily (``ignore_eos``;
`transformers`: ``min_new_tokens``); at concurrency C, C requests run at once (Baton: one engine, continuous
batching; `transformers`: one static batch of C). Loads are timed after the page cache has seen each file once
(both read the same bytes), each in a fresh child process, so one's allocations do not help the other, and end
when the model has computed its first logits (`transformers` maps safetensors lazily and reads them only then).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import log, machine_info, parser, results_path, write_results  # noqa: E402

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, max_position_embeddings=2048, tie_word_embeddings=True,
                 rope_theta=1000000.0, rms_norm_eps=1e-6)
QUICK = dict(QWEN2_05B, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=256, vocab_size=4096)
PROMPT_TOKENS = 16

LOADERS = {  # run in a child: seconds from nothing to a model that has computed its first logits
    "transformers": """
import time, torch, transformers
transformers.Qwen2ForCausalLM  # its lazy import is not part of the load
t = time.perf_counter()
m = transformers.AutoModelForCausalLM.from_pretrained({dir!r}, dtype="auto")
with torch.no_grad():
    m(torch.tensor([[1, 2, 3, 4]]))  # from_pretrained maps the file lazily: the load ends when the bytes are used
print(time.perf_counter() - t)""",
    "baton_snapshot": """
import time, paddle, storage
from infer.hf import read_config
from infer.model import Decoder
t = time.perf_counter()
config = read_config({dir!r})
model = Decoder(config)
model.eval()
storage.load_snapshot({snap!r}, "v1", into=model.state_dict(), cast=True)
with paddle.no_grad():
    model(paddle.to_tensor([[1, 2, 3, 4]]))
print(time.perf_counter() - t)""",
    "baton_model_dir": """
import time, paddle
from infer.hf import load_model_dir
t = time.perf_counter()
model = load_model_dir({dir!r})
with paddle.no_grad():
    model(paddle.to_tensor([[1, 2, 3, 4]]))
print(time.perf_counter() - t)""",
}


def save_model(sizes: dict, dtype: str, path: Path) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**sizes, dtype=dtype)
    model = transformers.Qwen2ForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)


def load_seconds(directory: Path, snap: Path) -> dict:
    out = {}
    for name, code in LOADERS.items():
        script = code.format(dir=str(directory), snap=str(snap))
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1200,
                              cwd=Path(__file__).resolve().parent.parent)
        if done.returncode:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
        out[name] = float(done.stdout.split()[-1])
        log(f"  load {name}: {out[name]:.2f} s")
    return out


def decode(directory: Path, concurrency: int, new_tokens: int) -> dict:
    """Tokens/s of Baton's engine and of `transformers` on the same prompts and weights."""
    import numpy as np
    import torch
    import transformers

    from infer.engine import EngineConfig
    from infer.generate import SamplingParams, generate
    from infer.hf import load_model_dir

    config = json.loads((directory / "config.json").read_text())
    rng = np.random.default_rng(concurrency)
    prompts = rng.integers(0, config["vocab_size"], (concurrency, PROMPT_TOKENS)).tolist()
    model = load_model_dir(str(directory))
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    settings = EngineConfig(max_num_seqs=concurrency, kv_cache_mb=4096)
    generate(model, [prompts[0][:4]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    ours = generate(model, prompts, params, settings)
    baton_s = time.perf_counter() - start
    assert all(len(c.tokens) == new_tokens for c in ours)
    del model

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto").eval()
    with torch.no_grad():
        hf.generate(torch.tensor([prompts[0][:4]]), max_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = hf.generate(torch.tensor(prompts),
                          attention_mask=torch.ones(concurrency, PROMPT_TOKENS, dtype=torch.long),
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        hf_s = time.perf_counter() - start
    same = sum(c.tokens == row[PROMPT_TOKENS:].tolist() for c, row in zip(ours, out))
    tokens = concurrency * new_tokens
    return {"concurrency": concurrency, "new_tokens": new_tokens, "baton_tokens_per_s": tokens / baton_s,
            "transformers_tokens_per_s": tokens / hf_s, "ratio": hf_s / baton_s, "same_greedy_tokens": same}


def main() -> int:
    args = parser(__doc__, "a small Qwen2 and few tokens").parse_args()
    import storage
    from infer.hf import read_model_dir

    sizes = QUICK if args.quick else QWEN2_05B
    new_tokens = 8 if args.quick else 32
    rows = []
    with tempfile.TemporaryDirectory(prefix="baton-hf-bench-") as tmp:
        for dtype in ("float32", "bfloat16"):
            directory, snap = Path(tmp) / dtype, Path(tmp) / f"{dtype}-snap"
            log(f"{dtype}: saving a random Qwen2 ({sizes['num_hidden_layers']} layers, hidden {sizes['hidden_size']})")
            save_model(sizes, dtype, directory)
            start = time.perf_counter()
            storage.publish(dict(read_model_dir(str(directory))[1]), str(snap), "v1")
            publish_s = time.perf_counter() - start
            nbytes = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
            loads = load_seconds(directory, snap)
            decodes = []
            for c in (1, 32):
                decodes.append(decode(directory, c, new_tokens))
                log(f"  decode c={c}: {decodes[-1]}")
            rows.append({"dtype": dtype, "bytes": nbytes, "publish_s": publish_s, "load_s": loads,
                         "load_ratio_snapshot": loads["transformers"] / loads["baton_snapshot"],
                         "load_ratio_model_dir": loads["transformers"] / loads["baton_model_dir"], "decode": decodes})
    doc = {"benchmark": "hf", "command": "python bench/hf_bench.py" + (" --quick" if args.quick else ""),
           "machine": machine_info(), "model": sizes, "rows": rows}
    print(table(doc))
    write_results(results_path(args, "hf"), doc)
    return 0


def table(doc: dict) -> str:
    lines = [f"{'dtype':<9}{'GiB':>6}{'load: HF s':>11}{'snapshot s':>11}{'ratio':>7}{'dir s':>7}{'ratio':>7}"
             f"{'c':>4}{'Baton tok/s':>12}{'HF tok/s':>10}{'ratio':>7}{'same':>6}"]
    for r in doc["rows"]:
        for i, d in enumerate(r["decode"]):
            head = (f"{r['dtype']:<9}{r['bytes'] / 2**30:>6.2f}{r['load_s']['transformers']:>11.2f}"
                    f"{r['load_s']['baton_snapshot']:>11.2f}{r['load_ratio_snapshot']:>7.2f}"
                    f"{r['load_s']['baton_model_dir']:>7.2f}{r['load_ratio_model_dir']:>7.2f}") if i == 0 else " " * 58
            lines.append(head + f"{d['concurrency']:>4}{d['baton_tokens_per_s']:>12.1f}"
                         f"{d['transformers_tokens_per_s']:>10.1f}{d['ratio']:>7.2f}{d['same_greedy_tokens']:>4}/"
                         f"{d['concurrency']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
