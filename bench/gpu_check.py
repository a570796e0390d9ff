"""GPU check of Baton's Triton kernels: correctness against the reference, bandwidth, and decode tokens/s.

    python3 bench/gpu_check.py --out gpu.json   # on a CUDA host, a few minutes; one VERDICT line at the end
    TRITON_INTERPRET=1 python3 bench/gpu_check.py --smoke   # the same code path on CPU, tiny sizes

The GPU host has PyTorch and Triton but no Paddle GPU build, so the kernels run here on torch CUDA tensors
(the launchers are framework-neutral; in the server they get Paddle tensors through Paddle's torch proxy).
The oracle is Baton's Paddle reference on CPU when Paddle is importable, else the same formulas in torch on
CPU; the output says which. Bandwidth is reported against the device's rated memory bandwidth and against a
plain ``torch`` copy of the same bytes measured in this run. Tokens/s decodes the ``small`` config with
random weights through the Triton kernels and cuBLAS matmuls (the same layer order as ``infer/model.py``);
engine tokens/s runs Baton's engine itself at concurrency 1 and 32 where a Paddle GPU build is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer.config import get_config  # noqa: E402  (pure Python: no Paddle needed)
from kernels import triton_ops  # noqa: E402

DEFAULT_OUT = str(Path(__file__).parent / "results" / "gpu.json")
from kernels.sizes import PAGE  # noqa: E402  (pure Python: no Paddle needed)

RATED_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "A10": 600}  # HBM/GDDR spec sheets, GB/s
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def oracle_backend():
    """Baton's Paddle reference when Paddle is here, else torch transcriptions of it."""
    try:
        import paddle

        from kernels import reference
    except ImportError:
        return "torch formulas on CPU (Paddle is not installed on this host)", None
    return "Baton's Paddle reference on CPU", (paddle, reference)


def to_paddle(paddle, t: torch.Tensor):
    x = t.detach().cpu()
    if x.dtype == torch.bfloat16:
        return paddle.to_tensor(x.view(torch.int16).numpy().view("uint16")).view(paddle.bfloat16)
    return paddle.to_tensor(x.numpy())


def from_paddle(paddle, x) -> torch.Tensor:
    return torch.from_numpy(x.astype("float32").numpy())


def expected(op: str, args: list[torch.Tensor], extra: dict, pd) -> torch.Tensor:
    """The oracle's answer for ``op`` as float32 on CPU."""
    if pd is not None:
        paddle, ref = pd
        p = [to_paddle(paddle, a) for a in args]
        if op == "cast_copy_":
            dst = paddle.zeros(list(args[0].shape), dtype=str(args[0].dtype).replace("torch.", ""))
            return from_paddle(paddle, ref.cast_copy_(dst, p[1]))
        if op == "rms_norm":
            return from_paddle(paddle, ref.rms_norm(p[0], p[1], extra["eps"], p[2])[0])
        if op == "rotary_":
            ref.rotary_(p[0], p[1], p[2], p[3])
            return from_paddle(paddle, p[0])
        if op == "swiglu":
            return from_paddle(paddle, ref.swiglu(p[0], p[1]))
        table, lengths = (paddle.to_tensor(extra[k].cpu().numpy()) for k in ("table", "lengths"))
        return from_paddle(paddle, ref.decode_attention(p[0], p[1], p[2], table, lengths, extra["scale"]))
    a = [x.detach().cpu().float() for x in args]
    if op == "cast_copy_":
        return a[1].to(args[0].dtype).float()
    if op == "rms_norm":
        h = a[0] + a[2]
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + extra["eps"]) * a[1]
    if op == "rotary_":
        x1, x2 = a[0].chunk(2, -1)
        c, s = a[2][None, :, None], a[3][None, :, None]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    if op == "swiglu":
        return torch.nn.functional.silu(a[0]) * a[1]
    group = a[0].shape[1] // a[1].shape[0]
    out = []
    for b, (pages, length) in enumerate(zip(extra["table"].cpu(), extra["lengths"].cpu())):
        k, v = (x[:, pages].flatten(1, 2)[:, :length].repeat_interleave(group, 0) for x in (a[1], a[2]))  # [H, L, D]
        p = torch.softmax(torch.einsum("hd,hld->hl", a[0][b], k) * extra["scale"], -1)
        out.append(torch.einsum("hl,hld->hd", p, v))
    return torch.stack(out)


def cases(dev: str, smoke: bool):
    """(op, launch, args, extra, bytes moved) for each kernel at a size that saturates memory."""
    bf = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype=bf):
        return torch.randn(*shape, generator=g).to(dtype).to(dev)

    n = 1 << 12 if smoke else 1 << 28
    rows, cols = (8, 96) if smoke else (1 << 15, 8192)
    seq, heads, kv, dim = (5, 4, 2, 16) if smoke else (1 << 14, 32, 8, 128)
    batch, length = (2, 70) if smoke else (64, 4096)
    out = []
    src, dst = rnd(n, dtype=torch.float32), torch.empty(n, dtype=bf, device=dev)
    out.append(("cast_copy_", lambda: triton_ops.cast_copy_(dst, src), [dst, src], {}, n * 6, dst))
    x, w, r = rnd(rows, cols), rnd(cols), rnd(rows, cols)
    o, r2 = torch.empty_like(x), torch.empty_like(x)
    out.append(("rms_norm", lambda: triton_ops.rms_norm(x, w, 1e-5, o, r, r2), [x, w, r], {"eps": 1e-5},
                rows * cols * 8, o))
    q, k = rnd(1, seq, heads, dim), rnd(1, seq, kv, dim)
    angles = torch.arange(seq)[:, None] * 10000.0 ** (-torch.arange(dim // 2) / (dim // 2))
    cos, sin = angles.cos().to(dev), angles.sin().to(dev)
    out.append(("rotary_", lambda: triton_ops.rotary_(q, k, cos, sin), [q, k, cos, sin], {},
                (q.numel() + k.numel()) * 4, q))
    gate, up = rnd(n // 4), rnd(n // 4)
    act = torch.empty_like(gate)
    out.append(("swiglu", lambda: triton_ops.swiglu(gate, up, act), [gate, up], {}, n // 4 * 6, act))
    blocks = -(-length // PAGE)
    qd, kp, vp = rnd(batch, heads, dim), rnd(kv, batch * blocks + 1, PAGE, dim), rnd(kv, batch * blocks + 1, PAGE, dim)
    table = (torch.randperm(batch * blocks, generator=g) + 1).view(batch, blocks).to(dev)
    lengths = torch.full((batch,), length, dtype=torch.int64, device=dev)
    att = torch.empty_like(qd)
    extra = {"table": table, "lengths": lengths, "scale": dim**-0.5}
    out.append(("decode_attention", lambda: triton_ops.decode_attention(qd, kp, vp, table, lengths, dim**-0.5, att),
                [qd, kp, vp], extra, 2 * batch * length * kv * dim * 2 + qd.numel() * 4, att))
    return out


def timed_ms(fn, dev: str, repeats: int) -> float:
    """Median milliseconds of ``fn`` after a warm-up, timed with CUDA events on a GPU."""
    fn()
    times = []
    for _ in range(repeats):
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def check_kernels(dev: str, smoke: bool, pd) -> list[dict]:
    rated = next((v for k, v in RATED_GBPS.items() if dev == "cuda" and k in torch.cuda.get_device_name()), None)
    rows = []
    for op, launch, args, extra, nbytes, result in cases(dev, smoke):
        oracle_args = [a.clone() for a in args]
        launch()
        got = result.float().cpu()
        want = expected(op, oracle_args, extra, pd)
        tol = TOL[result.dtype]
        err = float(((got - want).abs() / (want.abs() + 1)).max())
        ok = bool(torch.allclose(got, want, rtol=tol, atol=tol))
        ms = timed_ms(launch, dev, 3 if smoke else 20)
        blob = torch.empty(nbytes, dtype=torch.uint8, device=dev)  # a copy that reads and writes nbytes in all
        copy_ms = timed_ms(lambda: blob[nbytes // 2 :].copy_(blob[: nbytes // 2]), dev, 3 if smoke else 20)
        gbps = nbytes / ms / 1e6
        rows.append({"op": op, "ok": ok, "max_rel_err": err, "ms": ms, "GB/s": gbps,
                     "frac_of_rated": gbps / rated if rated else None,
                     "frac_of_torch_copy": copy_ms / ms})
    return rows


def decode_tokens_per_s(dev: str, smoke: bool, batch: int) -> float:
    """Greedy decode of the ``small`` config (random weights, bf16) through the Triton kernels."""
    c = get_config("tiny" if smoke else "small")
    bf, d, kvd = torch.bfloat16, c.head_dim, c.kv_heads * c.head_dim
    g = torch.Generator(device="cpu").manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * shape[0] ** -0.5).to(bf).to(dev)

    layers = [dict(n1=torch.ones(c.hidden, dtype=bf, device=dev), q=w(c.hidden, c.hidden), k=w(c.hidden, kvd),
                   v=w(c.hidden, kvd), o=w(c.hidden, c.hidden), n2=torch.ones(c.hidden, dtype=bf, device=dev),
                   gate=w(c.hidden, c.intermediate), up=w(c.hidden, c.intermediate),
                   down=w(c.intermediate, c.hidden)) for _ in range(c.layers)]
    embed, head, norm = w(c.vocab_size, c.hidden), w(c.hidden, c.vocab_size), torch.ones(c.hidden, dtype=bf, device=dev)
    steps, prefilled = (4, 8) if smoke else (256, 128)
    cache_len = prefilled + steps
    blocks = -(-cache_len // PAGE)
    table = (torch.arange(batch * blocks) + 1).view(batch, blocks).to(dev)  # page 0 stays free, as in the engine
    kc = [torch.randn(c.kv_heads, batch * blocks + 1, PAGE, d, generator=g).to(bf).to(dev) for _ in layers]
    vc = [torch.randn(c.kv_heads, batch * blocks + 1, PAGE, d, generator=g).to(bf).to(dev) for _ in layers]
    angles = torch.arange(cache_len)[:, None] * c.rope_theta ** (-torch.arange(d // 2) / (d // 2))
    cos, sin = angles.cos().to(dev).contiguous(), angles.sin().to(dev).contiguous()
    h, res = torch.empty(batch, c.hidden, dtype=bf, device=dev), torch.empty(batch, c.hidden, dtype=bf, device=dev)
    tokens = torch.zeros(batch, dtype=torch.long, device=dev)
    lengths = torch.zeros(batch, dtype=torch.int64, device=dev)

    def step(pos: int) -> torch.Tensor:
        x = embed[tokens]
        res.copy_(x)
        triton_ops.rms_norm(x, layers[0]["n1"], c.eps, h)
        for i, L in enumerate(layers):
            if i:
                triton_ops.rms_norm(x, L["n1"], c.eps, h, res, res)
            q = (h @ L["q"]).view(batch, 1, c.heads, d)
            k = (h @ L["k"]).view(batch, 1, c.kv_heads, d)
            triton_ops.rotary_(q, k, cos[pos : pos + 1], sin[pos : pos + 1])
            kc[i][:, table[:, pos // PAGE], pos % PAGE] = k[:, 0].transpose(0, 1)
            vc[i][:, table[:, pos // PAGE], pos % PAGE] = (h @ L["v"]).view(batch, c.kv_heads, d).transpose(0, 1)
            att = torch.empty(batch, c.heads, d, dtype=bf, device=dev)
            triton_ops.decode_attention(q.view(batch, c.heads, d), kc[i], vc[i], table, lengths + pos + 1,
                                        d**-0.5, att)
            x = att.view(batch, -1) @ L["o"]
            triton_ops.rms_norm(x, L["n2"], c.eps, h, res, res)
            gate, up = h @ L["gate"], h @ L["up"]
            triton_ops.swiglu(gate, up, gate)
            x = gate @ L["down"]
        triton_ops.rms_norm(x, norm, c.eps, h, res, res)
        return (h @ head).argmax(-1)

    tokens.copy_(step(prefilled - 1))
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for pos in range(prefilled, prefilled + steps):
        tokens.copy_(step(pos))
    if dev == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def engine_tokens_per_s(smoke: bool, concurrency: int) -> float | str:
    """Baton's own engine (``infer.engine``: Paddle model, paged KV cache, Triton decode attention) generating
    128 tokens for each of ``concurrency`` concurrent requests; needs a Paddle GPU build (CPU in --smoke)."""
    try:
        import paddle
    except ImportError:
        return "skipped: Paddle is not installed on this host"
    if not smoke and not paddle.is_compiled_with_cuda():
        return "skipped: no Paddle GPU build on this host (pip install paddlepaddle-gpu)"
    from infer.engine import Engine, EngineConfig
    from infer.generate import Fixed
    from infer.model import build_model
    from infer.sampling import SamplingParams

    paddle.set_device("cpu" if smoke else "gpu")
    model = build_model(get_config("tiny" if smoke else "small", dtype="float32" if smoke else "bfloat16"))
    engine = Engine(Fixed(model), model.config, EngineConfig(max_num_seqs=max(concurrency, 1)))
    params = SamplingParams(max_tokens=8 if smoke else 128, temperature=1.0, seed=0, ignore_eos=True)
    prompt = list(range(16 if smoke else 64))
    events: list = []
    for _ in range(concurrency):
        engine.submit([prompt], params, events.append)
    start = time.perf_counter()
    engine.run_until_idle()
    return sum(type(e).__name__ == "Token" for e in events) / (time.perf_counter() - start)


def _greedy(paddle, model, prompts: list[list[int]], steps: int) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs from Baton's engine over ``model``, one list per prompt."""
    from infer.engine import Engine, EngineConfig
    from infer.generate import Fixed
    from infer.sampling import SamplingParams

    engine = Engine(Fixed(model), model.config, EngineConfig(max_num_seqs=len(prompts)))
    params = SamplingParams(max_tokens=steps, temperature=0.0, logprobs=0, ignore_eos=True)
    events: list[list] = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):
        engine.submit([prompt], params, events[i].append)
    engine.run_until_idle()
    return [([e.token for e in ev if type(e).__name__ == "Token"],
             [e.logprob.logprob for e in ev if type(e).__name__ == "Token"]) for ev in events]


def paddle_checks(smoke: bool) -> dict:
    """With Paddle (a GPU build on a GPU host; the CPU build in --smoke), what the kernels alone cannot show:
    the engine's greedy tokens and logprobs on the Triton path equal ``BATON_KERNELS=reference`` on the same
    device (float32 and bfloat16 models), a tensor-parallel-2 update through the weight-apply kernel into
    strided shard views is bit-exact, and the device-side weight digest equals the host's formula."""
    try:
        import paddle
    except ImportError:
        return {"skipped": "Paddle is not installed on this host"}
    if not smoke and not paddle.is_compiled_with_cuda():
        return {"skipped": "no Paddle GPU build on this host (see README: paddlepaddle-gpu from Paddle's index)"}
    import tempfile

    import kernels
    import storage
    from infer import digest
    from infer.model import build_model, random_state_dict

    paddle.set_device("cpu" if smoke else "gpu")
    out: dict = {"device": paddle.get_device()}
    prompts, steps = [[1, 2, 3], list(range(10, 30)), [7] * 5], (4 if smoke else 32)
    for dtype in ("float32", "bfloat16"):
        config = get_config("tiny" if smoke else "small", dtype=dtype)
        model = build_model(config, random_state_dict(config, 0))
        triton_path = _greedy(paddle, model, prompts, steps)
        os.environ["BATON_KERNELS"] = "reference"
        kernels.dispatch._triton_ops.cache_clear()
        try:
            reference_path = _greedy(paddle, model, prompts, steps)
        finally:
            del os.environ["BATON_KERNELS"]
            kernels.dispatch._triton_ops.cache_clear()
        same = sum(a[0] == b[0] for a, b in zip(triton_path, reference_path))
        gap = max(abs(x - y) for a, b in zip(triton_path, reference_path) for x, y in zip(a[1], b[1]))
        tol = 2e-3 if dtype == "float32" else 5e-2
        out[f"engine_{dtype}"] = {"same_greedy_tokens": f"{same}/{len(prompts)}", "max_logprob_gap": gap,
                                  "ok": same == len(prompts) and gap <= tol, "backend": kernels.backend(
                                      next(iter(model.state_dict().values())))}
    config = get_config("tiny" if smoke else "small")
    state = random_state_dict(config, 1)
    with tempfile.TemporaryDirectory() as root:
        for rank, shard in enumerate(storage.split_state_dict(state, 2)):
            storage.publish(shard, root, "tp2", rank)
        model = build_model(config, random_state_dict(config, 2))
        params = model.state_dict()
        for rank in range(2):  # column shards are strided views: the weight-apply kernel must take them
            storage.load_snapshot(root, "tp2", rank=rank, into=storage.shard_views(params, rank, 2),
                                  copy_fn=kernels.cast_copy_)
        host = {n: digest.host_array(t) for n, t in params.items()}
        out["tp2_update"] = {"ok": all(np.array_equal(host[n], state[n]) for n in state)}
        device = digest.state_digest(params, "sum64")
        out["device_digest"] = {"ok": device == digest.state_digest(host, "sum64"), "digest": device}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1; no JSON")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"where the JSON goes (default {DEFAULT_OUT}; with --smoke "
                    "only when given)")
    args = ap.parse_args()
    dev = "cpu" if args.smoke else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --smoke under TRITON_INTERPRET=1 to exercise the code path", file=sys.stderr)
        return 2
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke needs TRITON_INTERPRET=1 (Triton's CPU interpreter)", file=sys.stderr)
        return 2
    oracle, pd = oracle_backend()
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (Triton interpreter)"
    print(f"device: {name}; tensors: torch {torch.__version__} ({'CUDA' if dev == 'cuda' else 'CPU'}), "
          f"no Paddle GPU build here; oracle: {oracle}")
    rows = check_kernels(dev, args.smoke, pd)
    print(f"{'kernel':<18}{'ok':>4}{'max rel err':>13}{'ms':>10}{'GB/s':>10}{'of rated':>10}{'of copy':>9}")
    for r in rows:
        rated = f"{r['frac_of_rated']:.2f}" if r["frac_of_rated"] is not None else "n/a"
        print(f"{r['op']:<18}{'yes' if r['ok'] else 'NO':>4}{r['max_rel_err']:>13.2e}{r['ms']:>10.3f}"
              f"{r['GB/s']:>10.0f}{rated:>10}{r['frac_of_torch_copy']:>9.2f}")
    decode = {f"batch {b}": decode_tokens_per_s(dev, args.smoke, b) for b in ((1,) if args.smoke else (1, 32))}
    for label, tps in decode.items():
        print(f"small decode, {label}: {tps:,.0f} tokens/s")
    engine = {f"concurrency {n}": engine_tokens_per_s(args.smoke, n) for n in ((1, 4) if args.smoke else (1, 32))}
    for label, tps in engine.items():
        print(f"engine (Paddle + Triton), {label}: " + (f"{tps:,.0f} tokens/s" if isinstance(tps, float) else tps))
    checks = paddle_checks(args.smoke)
    for label, value in checks.items():
        print(f"paddle: {label}: {value}")
    failed = [r["op"] for r in rows if not r["ok"]] + [k for k, v in checks.items() if isinstance(v, dict)
                                                         and not v.get("ok", True)]
    paddle_note = "Paddle checks skipped: " + checks["skipped"] if "skipped" in checks else \
        f"Paddle checks {len([v for v in checks.values() if isinstance(v, dict)])} run"
    result = {"device": name, "oracle": oracle, "torch": torch.__version__, "kernels": rows,
              "decode_tokens_per_s": decode, "engine_tokens_per_s": engine, "paddle": checks,
              "goal": "frac_of_rated >= 0.7 for elementwise and norm kernels", "failed": failed,
              "date": time.strftime("%Y-%m-%d")}
    if not args.smoke or args.out != DEFAULT_OUT:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    print(f"VERDICT: {'FAIL ' + ', '.join(failed) if failed else 'PASS'} ({sum(r['ok'] for r in rows)}/{len(rows)} "
          f"kernels match the oracle; {paddle_note})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
