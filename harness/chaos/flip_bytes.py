"""Scenario 2: every byte of a small snapshot (4 parts and the manifest) flipped, one at a time, and loaded into
Paddle tensors pre-filled with a sentinel. A flip in a part must never load; a manifest flip must be refused or
load bit-exact (harmless, and the field it changed is named)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import storage
from harness.chaos.loads import bytes_of, fill, judge_load, paddle_target
from harness.chaos.tally import Tally


def flip_state() -> dict:
    """The small snapshot whose every byte is flipped: 4 parts of about 2 KB, float32, bfloat16, float16, int64,
    an odd shape, and two same-shaped layers in one part (a one-bit flip turns one's name into the other's)."""
    import paddle

    rng = np.random.default_rng(11)
    return {
        "embed.weight": paddle.to_tensor(rng.standard_normal((16, 32), np.float32)),
        "layers.0.w": paddle.to_tensor(rng.standard_normal((8, 32), np.float32)),
        "layers.1.w": paddle.to_tensor(rng.standard_normal((8, 32), np.float32)),
        "layers.0.down": paddle.to_tensor(rng.standard_normal((24, 32), np.float32)).astype("bfloat16"),
        "norm.weight": paddle.to_tensor(rng.standard_normal(32).astype(np.float16)),
        "odd": paddle.to_tensor(rng.standard_normal((3, 5, 7), np.float32)),
        "lm_head.weight": paddle.to_tensor(rng.standard_normal((16, 32), np.float32)),
        "step": paddle.to_tensor(np.array([7], np.int64)),
    }


@dataclass(frozen=True)
class Flip:
    file: Path
    offset: int
    region: str  # "manifest", "length prefix", "header", "header padding" or "data"


def flip_sites(root: Path, data_stride: int, text_only: bool) -> list[Flip]:
    """Every byte of the manifest and of each part's header; every ``data_stride``-th byte of tensor data
    (none with ``text_only``)."""
    sites = []
    for f in sorted(root.iterdir()):
        raw = f.read_bytes()
        if f.name.endswith(".manifest.json"):
            sites += [Flip(f, i, "manifest") for i in range(len(raw))]
            continue
        n = int.from_bytes(raw[:8], "little")
        text_end = 8 + len(raw[8:8 + n].rstrip(b" "))
        sites += [Flip(f, i, "length prefix") for i in range(8)]
        sites += [Flip(f, i, "header") for i in range(8, text_end)]
        sites += [Flip(f, i, "header padding") for i in range(text_end, 8 + n)]
        if not text_only:
            sites += [Flip(f, i, "data") for i in range(8 + n, len(raw), data_stride)]
    return sites


def manifest_change(original: bytes, flipped: bytes) -> str:
    """Which manifest field a flip changed (``parts[].sha256``), for a flip that loaded bit-exact anyway."""
    try:
        a, b = json.loads(original), json.loads(flipped)
    except ValueError:
        return "unparseable JSON, yet loaded"

    def diff(x, y, path: str) -> list[str]:
        if isinstance(x, dict) and isinstance(y, dict):
            out = [f"{path}.{k}".lstrip(".") + " (key renamed)" for k in set(x) - set(y)]
            return out + [d for k in set(x) & set(y) for d in diff(x[k], y[k], f"{path}.{k}")]
        if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
            return [d for i, (u, v) in enumerate(zip(x, y)) for d in diff(u, v, f"{path}[]")]
        return [] if x == y else [path.lstrip(".")]

    return ", ".join(sorted(set(diff(a, b, "")))) or "no semantic change (formatting)"


def byte_flips(tally: Tally, workdir: Path, mask: int, verify: str, data_stride: int = 1,
               text_only: bool = False) -> None:
    """Flips one byte at a time (XOR ``mask``), loads with ``verify`` into a sentinel-filled target, restores the
    byte. A flip in a part must never load (with ``"stream"`` it may be caught after earlier tensors were
    written: detected-partial); a manifest flip must be refused or load bit-exact (harmless: the field is named)."""
    state = flip_state()
    root = workdir / f"flips-{mask:02x}-{verify}"
    storage.publish(state, str(root), "v1", part_bytes=2100, sha256=True)  # every manifest field present
    want = {"v1": bytes_of(state)}
    target, pattern = paddle_target(state)
    for site in flip_sites(root, data_stride, text_only):
        original = site.file.read_bytes()
        flipped = bytearray(original)
        flipped[site.offset] ^= mask
        site.file.write_bytes(flipped)
        try:
            kind, detail = judge_load(lambda: storage.load_snapshot(str(root), "v1", into=target, verify=verify),
                                      target, want)
        finally:
            site.file.write_bytes(original)
        tally.faults += 1
        if kind == "succeeded":  # the flip changed nothing that was loaded
            if site.region == "manifest":
                kind, detail = "harmless", manifest_change(original, bytes(flipped))
                tally.note(f"harmless manifest field: {detail}")
            else:
                kind, detail = "bad", f"flip in {site.file.name} {site.region} byte {site.offset} was not detected"
        elif kind != "bad":
            tally.note(f"{site.region}: {kind}")
        if kind == "bad":
            detail = f"{site.file.name} {site.region} byte {site.offset} ^{mask:#04x}: {detail}"
        tally.add(kind, detail)
        if bytes_of(target) != pattern:
            fill(target, pattern)


def header_name_duplicate(workdir: Path) -> dict:
    """The flip that makes a part's header name ``layers.1.w`` twice (and ``layers.0.w`` never), loaded with
    ``verify="none"``: a header check, not a checksum, is all that stands between it and a torn model."""
    state = flip_state()
    root = workdir / "dup-name"
    storage.publish(state, str(root), "v1", part_bytes=2100)
    part = next(p for p in root.glob("*.pdparams") if b'"layers.0.w"' in p.read_bytes())
    raw = part.read_bytes()
    part.write_bytes(raw.replace(b'"layers.0.w"', b'"layers.1.w"', 1))
    target, pattern = paddle_target(state)
    kind, detail = judge_load(lambda: storage.load_snapshot(str(root), "v1", into=target, verify="none"), target,
                              {"v1": bytes_of(state)})
    untouched = [n for n, b in bytes_of(target).items() if b == pattern[n]]
    return {"kind": kind, "detail": detail, "untouched_after_load": untouched}
