"""`baton demo` until the flows exist: publish a generated checkpoint, inspect it, load it back memory-bounded."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from . import audit, reader, writer
from .cli import human, parse_size


def make_checkpoint(total_bytes: int, layers: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """A decoder-shaped float32 state dict of about ``total_bytes``: embeddings plus per-layer projections."""
    rng = np.random.default_rng(seed)
    hidden = max(64, int((total_bytes / 4 / (13 * layers)) ** 0.5) // 64 * 64)  # 13 h^2 floats per layer
    sd = {"embed_tokens.weight": rng.standard_normal((256, hidden), np.float32)}
    for i in range(layers):
        for name, shape in (("self_attn.qkv_proj", (hidden, 3 * hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_up_proj", (hidden, 6 * hidden)), ("mlp.down_proj", (3 * hidden, hidden))):
            sd[f"layers.{i}.{name}.weight"] = rng.standard_normal(shape, np.float32)
        sd[f"layers.{i}.input_layernorm.weight"] = np.ones(hidden, np.float32)
    sd["lm_head.weight"] = rng.standard_normal((hidden, 256), np.float32)
    return sd


def main(args: argparse.Namespace) -> int:
    root = Path(args.dir).resolve() / "snapshots"
    root.mkdir(parents=True, exist_ok=True)
    version = f"demo-{int(time.time())}"
    print(f"1/4 generating a {human(args.size)} trainer checkpoint")
    sd = make_checkpoint(args.size)
    print(f"2/4 publishing {version} to {root} in parts of at most {human(args.part_size)}")
    pub = writer.publish(sd, str(root), version, part_bytes=args.part_size, progress=True)
    print(f"    {pub.parts} parts, {human(pub.bytes)} in {pub.seconds:.2f} s ({pub.gbps:.2f} GB/s)")
    print("3/4 inspecting what each loading level holds")
    for s in audit.inspect_snapshot(str(root), version):
        print(f"    level {int(s.level)} {s.level.label:<20} {s.state:<9} {human(s.bytes):>10}  {s.where}")
    target = {k: np.zeros_like(v) for k, v in sd.items()}
    print("4/4 loading it in place into a fresh copy of the weights")
    rep = reader.load_snapshot(str(root), version, into=target, progress=True)
    same = all(np.array_equal(target[k], sd[k]) for k in sd)
    print(f"    level {rep.level} ({rep.source}), {len(rep.files)} files, {human(rep.bytes)} in {rep.seconds:.2f} s "
          f"({rep.gbps:.2f} GB/s), verified: {rep.verified}; weights identical: {same}")
    print(f"done: see `baton inspect {root} --id {version}` and `baton versions {root}`")
    return 0 if same else 1


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default (local directory storage)")
    p.add_argument("--dir", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--size", type=parse_size, default=parse_size("256MiB"), help="checkpoint size (default 256MiB)")
    p.add_argument("--part-size", type=parse_size, default=parse_size("32MiB"), help="part size (default 32MiB)")
    p.set_defaults(func=main)
