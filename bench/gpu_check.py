"""GPU check of Baton's serving path: the Triton kernels against the reference, bandwidth, decode tokens/s, and,
where Paddle's GPU build is installed, the engine, weight updates and digest on Paddle GPU tensors.

    python3 bench/gpu_check.py --out gpu.json   # on a CUDA host, a few minutes; one VERDICT line at the end
    TRITON_INTERPRET=1 python3 bench/gpu_check.py --smoke   # the same code path on CPU, tiny sizes

It runs on whatever the host has. With torch + Triton, each kernel runs on torch tensors (the launchers are
framework-neutral) against Baton's Paddle reference where Paddle is importable (on Paddle's default device, the GPU
under a GPU build), else against the same formulas in torch on the CPU. With ``paddlepaddle-gpu``, the Paddle checks
run through Baton's dispatcher (Triton reached through Paddle's torch proxy; torch itself is not needed). Every check
runs in its own ``try``: one that raises is recorded as ``{"ok": false, "error": ...}`` and the run goes on, so the
JSON is written and the ``VERDICT: PASS|FAIL`` line printed whatever happens. ``--checks`` runs a subset.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer.config import get_config  # noqa: E402  (pure Python: no Paddle needed)
from kernels.sizes import PAGE  # noqa: E402  (pure Python: no Paddle needed)

DEFAULT_OUT = str(Path(__file__).parent / "results" / "gpu.json")
RATED_GBPS = {"H200": 4800, "H100": 3350, "A100": 2039, "L40S": 864, "A10": 600}  # HBM/GDDR spec sheets, GB/s
TOL = {"float32": 2e-5, "bfloat16": 1.6e-2, "float16": 2e-3}
LOGPROB_TOL = {"float32": 2e-3, "bfloat16": 5e-2}
KERNEL_CHECKS = ("kernels", "decode")
PADDLE_CHECKS = ("stream_of", "engine_float32", "engine_bfloat16", "tp2_update", "tp2_update_bf16", "device_digest",
                 "delta_update", "cast_copy_2g", "engine_speed")
CHECKS = KERNEL_CHECKS + PADDLE_CHECKS


def optional(name: str) -> ModuleType | None:
    """``name`` imported, or None where the host lacks it (a Paddle GPU host may have no torch, a torch host no
    Paddle)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def run_check(results: dict, name: str, fn: Callable[[], dict]) -> dict:
    """One check; whatever it raises becomes ``{"ok": False, "error": ...}`` so the run reaches its verdict."""
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - a check's failure is its result, never the end of the run
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
               "where": traceback.format_exc(limit=-3).strip().splitlines()[-3:]}
    results[name] = out
    print(f"{name}: {out}", flush=True)
    return out


# ---- the kernels on torch tensors ------------------------------------------------------------------------------

def oracle_backend(paddle: ModuleType | None) -> tuple[str, Any]:
    """Baton's Paddle reference where Paddle is here (it runs on Paddle's default device), else torch formulas."""
    if paddle is None:
        return "torch formulas on CPU (Paddle is not installed on this host)", None
    from kernels import reference

    return f"Baton's Paddle reference on {paddle.get_device()}", (paddle, reference)


def to_paddle(paddle, t):
    import torch

    x = t.detach().cpu()
    if x.dtype == torch.bfloat16:
        return paddle.to_tensor(x.view(torch.int16).numpy().view("uint16")).view(paddle.bfloat16)
    return paddle.to_tensor(x.numpy())


def from_paddle(paddle, x):
    import torch

    return torch.from_numpy(x.astype("float32").numpy())


def expected(op: str, args: list, extra: dict, pd):
    """The oracle's answer for ``op`` as a float32 CPU torch tensor."""
    import torch

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
    """(op, launch, args, extra, bytes moved, result) for each kernel at a size that saturates memory."""
    import torch

    from kernels import triton_ops

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


def timed_ms(fn: Callable[[], Any], dev: str, repeats: int) -> float:
    """Median milliseconds of ``fn`` after a warm-up, timed with CUDA events on a GPU."""
    import torch

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


def check_kernel(dev: str, smoke: bool, pd, case, rated: float | None) -> dict:
    import torch

    op, launch, args, extra, nbytes, result = case
    oracle_args = [a.clone() for a in args]
    launch()
    got = result.float().cpu()
    want = expected(op, oracle_args, extra, pd)
    tol = TOL[str(result.dtype).replace("torch.", "")]
    err = float(((got - want).abs() / (want.abs() + 1)).max())
    ms = timed_ms(launch, dev, 3 if smoke else 20)
    blob = torch.empty(nbytes, dtype=torch.uint8, device=dev)  # a copy that reads and writes nbytes in all
    copy_ms = timed_ms(lambda: blob[nbytes // 2 :].copy_(blob[: nbytes // 2]), dev, 3 if smoke else 20)
    gbps = nbytes / ms / 1e6
    return {"ok": bool(torch.allclose(got, want, rtol=tol, atol=tol)), "max_rel_err": err, "ms": ms, "GB/s": gbps,
            "frac_of_rated": gbps / rated if rated else None, "frac_of_torch_copy": copy_ms / ms}


def check_kernels(results: dict, dev: str, smoke: bool, pd) -> None:
    """Each kernel on torch tensors against the oracle, each op a check of its own."""
    import torch

    rated = next((v for k, v in RATED_GBPS.items() if dev == "cuda" and k in torch.cuda.get_device_name()), None)
    for case in cases(dev, smoke):
        run_check(results, f"kernel_{case[0]}", lambda case=case: check_kernel(dev, smoke, pd, case, rated))


def decode_tokens_per_s(dev: str, smoke: bool, batch: int) -> float:
    """Greedy decode of the ``small`` config (random weights, bf16) through the Triton kernels on torch tensors."""
    import torch

    from kernels import triton_ops

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

    def step(pos: int):
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


# ---- Paddle: the serving path on Paddle tensors ------------------------------------------------------------------

def _greedy(model, prompts: list[list[int]], steps: int) -> list[tuple[list[int], list[float]]]:
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


def compare_greedy(triton_path: list, reference_path: list) -> tuple[float, list[dict]]:
    """The largest logprob gap over each prompt's tokens up to and including its first differing greedy token (a
    near-tie flipped by rounding is not a kernel error; what follows it is another continuation), and where each
    prompt first diverged."""
    gap, divergences = 0.0, []
    for prompt, ((tokens, logps), (ref_tokens, ref_logps)) in enumerate(zip(triton_path, reference_path)):
        first = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), None)
        stop = len(tokens) if first is None else first + 1
        gap = max([gap, *(abs(x - y) for x, y in zip(logps[:stop], ref_logps[:stop]))])
        if first is not None:
            divergences.append({"prompt": prompt, "step": first, "triton": [tokens[first], logps[first]],
                                "reference": [ref_tokens[first], ref_logps[first]]})
    return gap, divergences


def engine_parity(paddle, smoke: bool, dtype: str) -> dict:
    """The engine's greedy tokens and logprobs on the Triton path against ``BATON_KERNELS=reference`` (Paddle ops)
    on the same device."""
    import kernels
    from infer.model import build_model, random_state_dict
    from kernels import dispatch

    prompts, steps = [[1, 2, 3], list(range(10, 30)), [7] * 5], (4 if smoke else 32)
    config = get_config("tiny" if smoke else "small", dtype=dtype)
    model = build_model(config, random_state_dict(config, 0))
    triton_path = _greedy(model, prompts, steps)
    os.environ["BATON_KERNELS"] = "reference"
    dispatch._triton_ops.cache_clear()
    try:
        reference_path = _greedy(model, prompts, steps)
    finally:
        del os.environ["BATON_KERNELS"]
        dispatch._triton_ops.cache_clear()
    gap, divergences = compare_greedy(triton_path, reference_path)
    same = sum(a[0] == b[0] for a, b in zip(triton_path, reference_path))
    return {"ok": gap <= LOGPROB_TOL[dtype], "same_greedy_tokens": f"{same}/{len(prompts)}",
            "max_logprob_gap_to_first_divergence": gap, "first_divergences": divergences,
            "backend": kernels.backend(next(iter(model.state_dict().values()))),
            "reference": f"BATON_KERNELS=reference (Paddle ops) on {paddle.get_device()}"}


def stream_of_check(paddle, smoke: bool) -> dict:
    """``stream_of`` on a real Paddle GPU tensor names the stream Paddle's own API reports, and a launch through the
    dispatcher on it computes what the reference does."""
    if not paddle.is_compiled_with_cuda():
        return {"skipped": f"no CUDA place in this Paddle build (tensors on {paddle.get_device()})"}
    import kernels
    from kernels import dispatch, reference

    ops = dispatch._triton_ops()
    if ops is None:
        return {"ok": False, "error": "Triton is not importable through Paddle's torch proxy"}
    x = paddle.randn([4099], "float32")
    device, stream = ops.stream_of(x)
    want = paddle.device.current_stream(paddle.CUDAPlace(device)).stream_base.cuda_stream
    got = paddle.zeros([4099], "bfloat16")
    kernels.cast_copy_(got, x)
    ref = reference.cast_copy_(paddle.zeros([4099], "bfloat16"), x)
    same = bool((got.view(paddle.int16) == ref.view(paddle.int16)).all())
    return {"ok": device == x.place.gpu_device_id() and stream == want and same, "device": device, "stream": stream,
            "paddle_stream": want, "launch_matches_reference": same, "backend": kernels.backend(x)}


def tp2_update(paddle, smoke: bool, dtype: str) -> dict:
    """A tensor-parallel-2 update: each rank's files written through the weight-apply kernel into strided column
    views of the full weights, bit-exact."""
    import kernels
    import storage
    from infer import digest
    from infer.model import build_model, random_state_dict

    config = get_config("tiny" if smoke else "small", dtype=dtype)
    state = build_model(config, random_state_dict(config, 1)).state_dict()  # in the model's dtype, bf16 included
    want = {n: digest.host_array(t).copy() for n, t in state.items()}
    with tempfile.TemporaryDirectory() as root:
        for rank, shard in enumerate(storage.split_state_dict(state, 2)):
            storage.publish(shard, root, "tp2", rank)
        params = build_model(config, random_state_dict(config, 2)).state_dict()
        for rank in range(2):
            storage.load_snapshot(root, "tp2", rank=rank, into=storage.shard_views(params, rank, 2),
                                  copy_fn=kernels.cast_copy_)
    wrong = [n for n in want if not np.array_equal(digest.host_array(params[n]), want[n])]
    return {"ok": not wrong, "dtype": dtype, "wrong": wrong[:5]}


def device_digest(paddle, smoke: bool) -> dict:
    """Each weight's ``sum64`` reduced on the device (one transfer for the model) equals the host formula over its
    bytes."""
    from infer import digest
    from infer.model import build_model, random_state_dict

    config = get_config("tiny" if smoke else "small", dtype="bfloat16")
    params = build_model(config, random_state_dict(config, 3)).state_dict()
    device = digest.device_sums(params, sorted(params))
    wrong = [n for n, t in params.items() if device[n] != digest.sum64(digest._words(digest.host_array(t)))]
    return {"ok": not wrong, "tensors": len(params), "wrong": wrong[:5], "digest": digest.state_digest(params, "sum64")}


@contextlib.contextmanager
def device_to_host(paddle) -> Iterator[list[int]]:
    """Records the bytes of every GPU tensor copied to the host inside (``.numpy()``, ``.cpu()``)."""
    moved: list[int] = []
    saved = {m: getattr(paddle.Tensor, m) for m in ("numpy", "cpu")}

    def counting(method: str):
        def wrapper(t, *args, **kwargs):
            if t.place.is_gpu_place():
                moved.append(int(t.numel()) * t.element_size())
            return saved[method](t, *args, **kwargs)
        return wrapper

    for method in saved:
        setattr(paddle.Tensor, method, counting(method))
    try:
        yield moved
    finally:
        for method, fn in saved.items():
            setattr(paddle.Tensor, method, fn)


def nudged(state: dict, fraction: float = 0.02) -> dict:
    """``state`` with ``fraction`` of each tensor's elements moved one unit in the last place: a small RL step."""
    rng = np.random.default_rng(7)
    out = {}
    for name, t in state.items():
        a = t.astype("float32").numpy()
        flat = a.reshape(-1)
        pick = rng.random(flat.size) < fraction
        flat[pick] = flat[pick] * np.float32(1.0 + 2**-6)  # past one bf16 ulp
        out[name] = a
    return out


def delta_update(paddle, smoke: bool) -> dict:
    """A delta version through ``WeightManager`` onto the base the served copy holds: loaded as a delta, and the
    model never copied whole to the host."""
    import storage
    from infer.model import build_model, random_state_dict
    from infer.weights import WeightManager

    config = get_config("tiny" if smoke else "small", dtype="bfloat16")
    base = build_model(config, random_state_dict(config, 5)).state_dict()
    new = {n: paddle.to_tensor(a).astype("bfloat16") for n, a in nudged(base).items()}
    model_bytes = sum(int(t.numel()) * t.element_size() for t in base.values())
    with tempfile.TemporaryDirectory() as root:
        storage.publish(dict(base), root, "v0")
        kind = storage.publish(new, root, "v1", base="v0").kind
        manager = WeightManager(config, root)
        manager.update("v0")
        with device_to_host(paddle) as moved:
            info = manager.update("v1")
    return {"ok": info.path == "delta" and sum(moved) < model_bytes, "published": kind, "load_path": info.path,
            "device_to_host_bytes": sum(moved), "model_bytes": model_bytes, "host_copies": len(moved)}


def cast_copy_2g(paddle, smoke: bool) -> dict:
    """One weight-apply of 2**31 + 16 bf16 elements (past int32 offsets) from float32: the windows at the start,
    across 2**31 and at the end equal the reference's cast of the same values."""
    import kernels
    from kernels import reference

    n = (1 << 12 if smoke else 1 << 31) + 16
    boundary = n - 16
    src = paddle.randn([n], "float32")
    dst = paddle.zeros([n], "bfloat16")
    kernels.cast_copy_(dst, src)
    bad = []
    for start in (0, boundary - 4096, n - 64):
        window = slice(start, min(start + 4096 + 64, n))
        want = reference.cast_copy_(paddle.zeros([window.stop - start], "bfloat16"), src[window])
        if not bool((dst[window].view(paddle.int16) == want.view(paddle.int16)).all()):
            bad.append(start)
    return {"ok": not bad, "elements": n, "wrong_windows_at": bad, "backend": kernels.backend(dst)}


def engine_tokens_per_s(paddle, smoke: bool) -> dict:
    """Baton's own engine (Paddle model, paged KV cache, Triton decode attention) generating 128 tokens for each of
    1 and 32 concurrent requests (8 tokens for 1 and 4 in --smoke)."""
    from infer.engine import Engine, EngineConfig
    from infer.generate import Fixed
    from infer.model import build_model
    from infer.sampling import SamplingParams

    model = build_model(get_config("tiny" if smoke else "small", dtype="float32" if smoke else "bfloat16"))
    out = {}
    for concurrency in (1, 4) if smoke else (1, 32):
        engine = Engine(Fixed(model), model.config, EngineConfig(max_num_seqs=concurrency))
        params = SamplingParams(max_tokens=8 if smoke else 128, temperature=1.0, seed=0, ignore_eos=True)
        events: list = []
        for _ in range(concurrency):
            engine.submit([list(range(16 if smoke else 64))], params, events.append)
        start = time.perf_counter()
        engine.run_until_idle()
        out[f"concurrency {concurrency}"] = sum(type(e).__name__ == "Token" for e in events) / (
            time.perf_counter() - start)
    return {"tokens_per_s": out}


def paddle_checks(results: dict, paddle, smoke: bool, wanted: set[str]) -> None:
    """Each Paddle check in its own ``try``, on Paddle's GPU (its CPU build in --smoke)."""
    paddle.set_device("cpu" if smoke else "gpu")
    checks: dict[str, Callable[[], dict]] = {
        "stream_of": lambda: stream_of_check(paddle, smoke),
        "engine_float32": lambda: engine_parity(paddle, smoke, "float32"),
        "engine_bfloat16": lambda: engine_parity(paddle, smoke, "bfloat16"),
        "tp2_update": lambda: tp2_update(paddle, smoke, "float32"),
        "tp2_update_bf16": lambda: tp2_update(paddle, smoke, "bfloat16"),
        "device_digest": lambda: device_digest(paddle, smoke),
        "delta_update": lambda: delta_update(paddle, smoke),
        "cast_copy_2g": lambda: cast_copy_2g(paddle, smoke),
        "engine_speed": lambda: engine_tokens_per_s(paddle, smoke),
    }
    for name, fn in checks.items():
        if name in wanted:
            run_check(results, name, fn)


# ---- the run -----------------------------------------------------------------------------------------------------

def environment(smoke: bool, torch, paddle) -> dict:
    """What this host has: which device the checks run on and which frameworks are here."""
    env: dict[str, Any] = {"torch": getattr(torch, "__version__", None), "paddle": getattr(paddle, "__version__", None),
                           "paddle_cuda": bool(paddle and paddle.is_compiled_with_cuda()),
                           "triton": getattr(optional("triton"), "__version__", None)}
    if smoke:
        env["device"] = "CPU (Triton interpreter)"
    elif torch is not None and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    elif env["paddle_cuda"] and paddle.device.cuda.device_count() > 0:
        env["device"] = paddle.device.cuda.get_device_name()
    else:
        env["device"] = None
    return env


def verdict(results: dict) -> tuple[bool, str]:
    failed = [name for name, r in results.items() if r.get("ok") is False]
    ran = [name for name, r in results.items() if "ok" in r or "tokens_per_s" in r]
    skipped = [f"{name} ({r['skipped']})" for name, r in results.items() if "skipped" in r]
    line = f"{len(ran) - len(failed)}/{len(ran)} checks passed"
    if failed:
        line += "; failed: " + ", ".join(failed)
    if skipped:
        line += "; skipped: " + "; ".join(skipped)
    return not failed and bool(ran), line


def run(args, results: dict) -> None:
    torch, paddle = optional("torch"), optional("paddle")
    env = results["environment"] = environment(args.smoke, torch, paddle)
    print(f"device: {env['device']}; torch {env['torch']}, paddle {env['paddle']} (CUDA build: {env['paddle_cuda']}),"
          f" triton {env['triton']}", flush=True)
    if env["device"] is None:
        results["environment"].update(ok=False, error="no CUDA device here: run with --smoke under TRITON_INTERPRET=1 "
                                                         "to exercise the code path")
        return
    wanted = set(args.checks.split(",")) if args.checks else set(CHECKS)
    dev = "cpu" if args.smoke else "cuda"
    if torch is None:
        results["kernels"] = {"skipped": "torch is not installed on this host: the kernels run through Paddle below"}
    elif not (args.smoke or torch.cuda.is_available()):
        results["kernels"] = {"skipped": "torch sees no CUDA device here: the kernels run through Paddle below"}
    else:
        oracle, pd = oracle_backend(paddle)
        results["oracle"] = {"label": oracle}
        print(f"oracle: {oracle}", flush=True)
        if "kernels" in wanted:
            check_kernels(results, dev, args.smoke, pd)
        if "decode" in wanted:
            run_check(results, "decode", lambda: {"tokens_per_s": {
                f"batch {b}": decode_tokens_per_s(dev, args.smoke, b) for b in ((1,) if args.smoke else (1, 32))}})
    if paddle is None:
        results["paddle"] = {"skipped": "Paddle is not installed on this host: kernels only"}
    elif not args.smoke and not paddle.is_compiled_with_cuda():
        results["paddle"] = {"skipped": "no Paddle GPU build on this host (see docs/model.md: paddlepaddle-gpu from "
                                        "Paddle's index)"}
    else:
        paddle_checks(results, paddle, args.smoke, wanted)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1; no JSON")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"where the JSON goes (default {DEFAULT_OUT}; with --smoke "
                    "only when given)")
    ap.add_argument("--checks", default="", help=f"comma-separated subset of: {', '.join(CHECKS)} (default: all)")
    args = ap.parse_args()
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        print("--smoke needs TRITON_INTERPRET=1 (Triton's CPU interpreter)", file=sys.stderr)
        return 2
    results: dict[str, dict] = {}
    try:
        run(args, results)
    except Exception as exc:  # noqa: BLE001 - outside any one check: still a result, still a verdict
        results["run"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                          "where": traceback.format_exc(limit=-3).strip().splitlines()[-3:]}
        print(f"run: {results['run']}", flush=True)
    finally:
        passed, line = verdict(results)
        results["verdict"] = {"passed": passed, "summary": line, "date": time.strftime("%Y-%m-%d"),
                              "goal": "frac_of_rated >= 0.7 for elementwise and norm kernels"}
        if not args.smoke or args.out != DEFAULT_OUT:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
            print(f"wrote {args.out}")
        print(f"VERDICT: {'PASS' if passed else 'FAIL'} ({line})", flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
