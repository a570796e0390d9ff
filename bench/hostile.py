#!/usr/bin/env python
"""Hostile inputs against the loader, as an attacker would send them: malformed safetensors headers, manifests,
manifest-less parts and level-4 pickles. Each runs in its own process under a 2 GiB address-space cap and a
timeout; anything but a clean refusal (a ``SnapshotError``/``OSError`` naming the file, within the time, with
memory growth within a few times the input) counts as misbehaving. The goal is 0.

    python bench/hostile.py            # ~1-2 minutes; writes bench/results/hostile.json
"""

from __future__ import annotations

import argparse
import json
import pickle
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import storage  # noqa: E402
from bench.common import RESULTS_DIR, log, machine_info  # noqa: E402
from storage import layout  # noqa: E402

FULL = layout.full_name(0, "h")
MANIFEST = layout.manifest_name(0, "h")
TIMEOUT_S = 60
_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
import numpy as np, storage
from storage.tensorfile import DTYPE_CODES
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    src = storage.resolve(sys.argv[1], "h", fallback_dir=sys.argv[2])
    parsed = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the targets below are the harness's, not parsing
    targets = {n: np.zeros(shape, DTYPE_CODES[code][0]) for n, (code, shape) in src.index().items()}
    apply = getattr(storage, "apply_source", None) or __import__("storage.reader").reader.apply_source  # older trees
    apply(src, targets)
    out = {"outcome": "loaded"}
except (storage.SnapshotError, OSError) as exc:
    out = {"outcome": "refused", "error": type(exc).__name__, "message": str(exc)[:400]}
except BaseException as exc:
    out = {"outcome": "wrong error", "error": type(exc).__name__, "message": str(exc)[:400]}
out["rss_growth"] = (globals().get("parsed") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024 - base * 1024
print(json.dumps(out))
"""


@dataclass
class Case:
    kind: str
    name: str
    files: dict[str, bytes]  # "root/<name>" or "fallback/<name>" -> bytes
    valid: bool = False  # a legal but costly input: it must load, within the memory bound


# ---- safetensors headers (level 2, the single full file) --------------------------------------------------

def _st(header: bytes, data: bytes = b"", pad: bool = True) -> bytes:
    if pad:
        header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data


def _entry(shape: bytes, offsets: bytes = b"[0,0]", dtype: bytes = b'"U8"') -> bytes:
    return b'{"a":{"dtype":%s,"shape":%s,"data_offsets":%s}}' % (dtype, shape, offsets)


def header_cases() -> list[Case]:
    tiny = b"{" + b",".join(b'"t%08d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % i
                            for i in range(1_500_000)) + b"}"
    raw = {
        "length 0": struct.pack("<Q", 0),
        "length past the file": struct.pack("<Q", 1 << 20) + b"{}",
        "length 2**64-1": struct.pack("<Q", (1 << 64) - 1) + b"{}      ",
        "3-byte file": b"\x01\x00\x00",
        "header over the 100 MiB cap": struct.pack("<Q", (100 << 20) + 8) + b"{" + b" " * ((100 << 20) + 7),
        "pickle bytes at level 2": pickle.dumps({"a": np.zeros(2)}, protocol=4),
        "not JSON": _st(b"{nope}"),
        "JSON list": _st(b"[1,2]"),
        "JSON string": _st(b'"x"'),
        "nested 100k deep": _st(b"[" * 100_000 + b"]" * 100_000),
        "nested 5M deep (10 MiB)": _st(b'{"a":' * 5_000_000 + b"1" + b"}" * 5_000_000),
        "5000-digit integer": _st(_entry(b"[" + b"9" * 5000 + b"]")),
        "NaN": _st(_entry(b"[NaN]")),
        "invalid UTF-8": _st(b'{"\xff\xfe":1}'),
        "__metadata__ a list": _st(b'{"__metadata__":[1]}'),
        "__metadata__ nested": _st(b'{"__metadata__":{"a":{"b":1}}}'),
        "dim 2**63": _st(_entry(b"[9223372036854775808,0]")),
        "product overflows": _st(_entry(b"[" + b",".join([b"4294967295"] * 60) + b"]")),
        "65 dims": _st(_entry(b"[" + b",".join([b"1"] * 65) + b"]", b"[0,1]"), b"\0"),
        "bool dim": _st(_entry(b"[true]", b"[0,1]"), b"\0"),
        "negative dim": _st(_entry(b"[-1]")),
        "float dim": _st(_entry(b"[1.0]", b"[0,1]"), b"\0"),
        "unknown dtype": _st(_entry(b"[1]", b"[0,8]", b'"C64"'), b"\0" * 8),
        "dtype a list": _st(_entry(b"[1]", b"[0,1]", b'["U8"]'), b"\0"),
        "offsets reversed": _st(_entry(b"[1]", b"[1,0]"), b"\0"),
        "offsets past the file": _st(_entry(b"[16]", b"[0,16]"), b"\0" * 8),
        "offsets of 3": _st(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2]}}', b"\0"),
        "overlap": _st(b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
                       b'"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}', b"\0" * 3),
        "hole": _st(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"\0" * 2),
        "trailing bytes": _st(_entry(b"[1]", b"[0,1]"), b"\0" * 9),
        "truncated data": _st(_entry(b"[64]", b"[0,64]"), b"\0" * 10),
        "shape/bytes mismatch": _st(_entry(b"[3]", b"[0,4]"), b"\0" * 4),
        "duplicate name": _st(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                              b'"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"\0" * 2),
        "extra key in an entry": _st(b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}', b"\0"),
        "entry a string": _st(b'{"a":"x"}'),
    }
    cases = [Case("header", name, {f"root/{FULL}": data}) for name, data in raw.items()]
    return cases + [Case("header", "60 MiB of tiny entries (legal)", {f"root/{FULL}": _st(tiny)}, valid=True)]


# ---- manifests and parts (level 1) ------------------------------------------------------------------------

def _published() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as d:
        rng = np.random.default_rng(0)
        state = {f"w{i}": rng.standard_normal((16, 16), dtype=np.float32) for i in range(6)}
        storage.publish(state, d, "h", part_bytes=2 << 10)
        return {f"root/{p.name}": p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


def _manifest_edit(good: dict[str, bytes], change) -> dict[str, bytes]:
    doc = json.loads(good[f"root/{MANIFEST}"])
    change(doc)
    return good | {f"root/{MANIFEST}": json.dumps(doc).encode()}


def _flip_last(good: dict[str, bytes], index: int) -> dict[str, bytes]:
    key = f"root/{layout.part_name(0, 'h', index)}"
    return good | {key: good[key][:-1] + bytes([good[key][-1] ^ 1])}


def manifest_cases() -> list[Case]:
    good = _published()
    first = lambda d: next(iter(d["tensors"].values()))  # noqa: E731
    edits = {
        "xxh3 empty": lambda d: d["parts"][1].__setitem__("xxh3_128", ""),
        "xxh3 null": lambda d: d["parts"][1].__setitem__("xxh3_128", None),
        "xxh3 short": lambda d: d["parts"][1].__setitem__("xxh3_128", "00"),
        "xxh3 not hex": lambda d: d["parts"][1].__setitem__("xxh3_128", "z" * 32),
        "xxh3 a number": lambda d: d["parts"][1].__setitem__("xxh3_128", 7),
        "sha256 missing": lambda d: d["parts"][0].pop("sha256"),
        "parts a dict": lambda d: d.__setitem__("parts", {"0": 1}),
        "zero parts": lambda d: d.__setitem__("parts", []),
        "rank a string": lambda d: d.__setitem__("rank", "0"),
        "rank mismatch": lambda d: d.__setitem__("rank", 1),
        "id mismatch": lambda d: d.__setitem__("id", "other"),
        "format_version 999": lambda d: d.__setitem__("format_version", 999),
        "bytes a float": lambda d: d["parts"][0].__setitem__("bytes", 1.5),
        "bytes wrong": lambda d: d["parts"][0].__setitem__("bytes", 12),
        "negative index": lambda d: d["parts"][0].__setitem__("index", -1),
        "part file another part": lambda d: d["parts"][0].__setitem__("file", layout.part_name(0, "h", 1)),
        "part file a path": lambda d: d["parts"][0].__setitem__("file", "../../etc/passwd"),
        "shape 2**63": lambda d: first(d).__setitem__("shape", [1 << 63]),
        "shape of strings": lambda d: first(d).__setitem__("shape", ["16"]),
        "tensor in part 99": lambda d: first(d).__setitem__("part", 99),
        "dtype unknown": lambda d: first(d).__setitem__("dtype", "C64"),
        "metadata a list": lambda d: d.__setitem__("metadata", [1]),
        "metadata nested": lambda d: d.__setitem__("metadata", {"a": {"b": 1}}),
        "a tensor dropped": lambda d: d["tensors"].pop(next(iter(d["tensors"]))),
    }
    cases = [Case("manifest", name, _manifest_edit(good, e)) for name, e in edits.items()]
    raw = {
        "nested 100k deep": b"[" * 100_000 + b"]" * 100_000,
        "5000-digit integer": b'{"format":"baton.snapshot","format_version":1' + b"1" * 5000 + b"}",
        "not UTF-8": b"\xff\xfe{}",
        "NaN": b'{"format":"baton.snapshot","format_version":NaN}',
        "a list": b"[]",
        "70 MiB (over the cap)": b'{"format":"baton.snapshot",' + b" " * (70 << 20) + b"}",
    }
    cases += [Case("manifest", name, good | {f"root/{MANIFEST}": data}) for name, data in raw.items()]
    cases.append(Case("manifest", "flipped data byte, digests intact", _flip_last(good, 1)))
    cases.append(Case("manifest", "flipped data byte, xxh3 emptied",
                      _manifest_edit(_flip_last(good, 1), edits["xxh3 empty"])))
    extra = f"root/{layout.part_name(0, 'h', 40)}"
    cases.append(Case("manifest", "stray part not in the manifest",
                      good | {extra: good[f"root/{layout.part_name(0, 'h', 0)}"]}))
    bare = {k: v for k, v in good.items() if not k.endswith(".manifest.json")}
    cases.append(Case("parts", "gap in numbering", {k: v for k, v in bare.items() if ".part1." not in k}))
    cases.append(Case("parts", "publish in progress", bare | {f"root/{layout.pending_name(0, 'h')}": b""}))
    dup = f"root/{layout.part_name(0, 'h', len(bare))}"
    cases.append(Case("parts", "tensor in two parts", bare | {dup: bare[f"root/{layout.part_name(0, 'h', 0)}"]}))
    cases.append(Case("parts", "part header corrupt",
                      bare | {f"root/{layout.part_name(0, 'h', 1)}": b"\x10" + b"\0" * 15}))
    return cases


# ---- level-4 pickles ----------------------------------------------------------------------------------------

P = pickle


def _p4(body: bytes) -> bytes:
    return P.PROTO + b"\x04" + body + P.STOP


def _global(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def _key_dict(key_ops: bytes) -> bytes:
    return _p4(P.EMPTY_DICT + key_ops + P.NONE + P.SETITEM)


def _array(dtype: str, raw: bytes, shape: tuple[int, ...], flags: int = 0) -> bytes:
    """An ndarray as numpy pickles it, with a chosen dtype string and dtype state flags."""
    shp = P.MARK + b"".join(P.BININT + struct.pack("<i", d) for d in shape) + P.TUPLE
    dt = (_global("numpy", "dtype") + P.SHORT_BINUNICODE + bytes([len(dtype)]) + dtype.encode() + P.NEWFALSE
          + P.NEWTRUE + P.TUPLE3 + P.REDUCE + P.MARK + P.BININT1 + b"\x03" + P.SHORT_BINUNICODE + b"\x01|" + P.NONE
          + P.NONE + P.NONE + P.BININT + struct.pack("<i", -1) + P.BININT + struct.pack("<i", -1) + P.BININT
          + struct.pack("<i", flags) + P.TUPLE + P.BUILD)
    state = (P.MARK + P.BININT1 + b"\x01" + shp + dt + P.NEWFALSE + P.BINBYTES + struct.pack("<I", len(raw)) + raw
             + P.TUPLE)
    return (_global("numpy.core.multiarray", "_reconstruct") + _global("numpy", "ndarray") + P.BININT1 + b"\x00"
            + P.TUPLE1 + P.SHORT_BINBYTES + b"\x01b" + P.TUPLE3 + P.REDUCE + state + P.BUILD)


def _state_pickle(value: bytes) -> bytes:
    return _p4(P.EMPTY_DICT + P.SHORT_BINUNICODE + b"\x01w" + value + P.SETITEM)


def pickle_cases() -> list[Case]:
    shared = P.EMPTY_TUPLE + P.MEMOIZE + b"".join(
        P.LONG_BINGET + struct.pack("<I", i) + P.LONG_BINGET + struct.pack("<I", i) + P.TUPLE2 + P.MEMOIZE
        for i in range(64))
    good = pickle.dumps({"w": np.arange(4, dtype=np.float32)}, protocol=4)
    raw = {
        "REDUCE os.system": _p4(_global("os", "system") + P.SHORT_BINUNICODE + b"\x04true" + P.TUPLE1 + P.REDUCE),
        "GLOBAL builtins.eval": _p4(_global("builtins", "eval") + P.SHORT_BINUNICODE + b"\x011" + P.TUPLE1 + P.REDUCE),
        "STACK_GLOBAL posix.system": _p4(P.SHORT_BINUNICODE + b"\x05posix" + P.SHORT_BINUNICODE + b"\x06system"
                                         + P.STACK_GLOBAL),
        "INST subprocess": P.PROTO + b"\x02" + P.MARK + P.INST + b"subprocess\nPopen\n" + P.STOP,
        "persistent id": _p4(P.SHORT_BINUNICODE + b"\x01x" + P.BINPERSID),
        "EXT1": _p4(P.EXT1 + b"\x01"),
        "key nested 1M tuples deep": _key_dict(P.EMPTY_TUPLE + P.TUPLE1 * 1_000_000),
        "key: shared tuple 64 levels": _key_dict(shared),
        "key: an int": _key_dict(P.BININT1 + b"\x05"),
        "LONG_BINPUT 2**25": _p4(P.NONE + P.LONG_BINPUT + struct.pack("<I", 1 << 25)),
        "GET never PUT": _p4(P.LONG_BINGET + struct.pack("<I", 1 << 30)),
        "BINBYTES8 2**40": _p4(P.BINBYTES8 + struct.pack("<Q", 1 << 40)),
        "BINUNICODE8 2**40": _p4(P.BINUNICODE8 + struct.pack("<Q", 1 << 40)),
        "FRAME 2**40": P.PROTO + b"\x04" + P.FRAME + struct.pack("<Q", 1 << 40),
        "dtype O, flags 0": _state_pickle(_array("O8", b"\x41" * 8, (1,), flags=0)),
        "dtype complex64": _state_pickle(_array("c8", b"\0" * 8, (1,))),
        "dtype big-endian": _state_pickle(_array(">f4", b"\0" * 4, (1,))),
        "dtype structured": _state_pickle(_array("V8", b"\0" * 8, (1,))),
        "shape negative": _state_pickle(_array("f4", b"\0" * 4, (-1,))),
        "shape/bytes mismatch": _state_pickle(_array("f4", b"\0" * 4, (1000,))),
        "value a list": _state_pickle(P.EMPTY_LIST),
        "value a nested dict": _state_pickle(P.EMPTY_DICT),
        "not a dict": _p4(P.NONE),
        "no STOP": good[:-1],
        "empty after PROTO": P.PROTO + b"\x04",
        "stack underflow": _p4(P.SETITEM),
        "MARK without a tuple": _p4(P.MARK),
        "protocol 5 out-of-band buffer": P.PROTO + b"\x05" + P.NEXT_BUFFER + P.STOP,
    }
    for cut in (2, len(good) // 3, len(good) // 2, len(good) - 20):
        raw[f"paddle.save-style pickle cut at {cut}"] = good[:cut]
    return [Case("pickle", name, {f"fallback/{FULL}": data}) for name, data in raw.items()]


# ---- running ----------------------------------------------------------------------------------------------

def run_case(case: Case) -> dict:
    with tempfile.TemporaryDirectory() as d:
        for rel, data in case.files.items():
            path = Path(d, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        Path(d, "root").mkdir(exist_ok=True)
        size = sum(len(v) for v in case.files.values())
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(Path(d, "root")), str(Path(d, "fallback"))],
                                  capture_output=True, text=True, timeout=TIMEOUT_S, cwd=Path(__file__).parent.parent)
        except subprocess.TimeoutExpired:
            return {"kind": case.kind, "name": case.name, "outcome": "hang", "ok": False}
    if proc.returncode != 0:
        return {"kind": case.kind, "name": case.name, "outcome": f"crash (exit {proc.returncode})", "ok": False,
                "stderr": proc.stderr[-300:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    named = "model_state.tp0.h" in out.get("message", "")
    bounded = out["rss_growth"] <= max(64 << 20, 8 * size)
    expected = out["outcome"] == "loaded" if case.valid else out["outcome"] == "refused" and named
    out.update(kind=case.kind, name=case.name, bytes=size, names_file=named, ok=expected and bounded)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="header,manifest,pickle", help="comma-separated kinds to try")
    kinds = p.parse_args().only.split(",")
    makers = {"header": header_cases, "manifest": manifest_cases, "pickle": pickle_cases}
    cases = [c for k in kinds for c in makers[k]()]
    log(f"{len(cases)} hostile inputs, each in its own process (2 GiB cap, {TIMEOUT_S} s timeout)")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run_case, cases))
    bad = [r for r in results if not r["ok"]]
    kinds = sorted({r["kind"] for r in results})
    print(f"{'inputs':<10} {'tried':>6} {'refused cleanly':>16} {'misbehaved':>11}")
    for k in kinds:
        rows = [r for r in results if r["kind"] == k]
        print(f"{k:<10} {len(rows):>6} {sum(r['ok'] for r in rows):>16} {sum(not r['ok'] for r in rows):>11}")
    for r in bad:
        print(f"  MISBEHAVED {r['kind']}: {r['name']}: {r['outcome']} {r.get('error', '')} "
              f"{r.get('message', '')[:160]}")
    worst = max(results, key=lambda r: r.get("rss_growth", 0) / max(r.get("bytes", 1), 1 << 20))
    summary = {"tried": len(results), "misbehaved": len(bad),
               "by_kind": {k: {"tried": sum(r["kind"] == k for r in results),
                               "misbehaved": sum(r["kind"] == k and not r["ok"] for r in results)} for k in kinds},
               "largest_rss_growth": {"name": worst["name"], "bytes": worst.get("bytes"),
                                      "rss_growth": worst.get("rss_growth")}}
    doc = {"machine": machine_info(), "summary": summary, "cases": results}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "hostile.json").write_text(json.dumps(doc, indent=1) + "\n")
    log(f"wrote {RESULTS_DIR / 'hostile.json'}: {len(bad)} of {len(results)} misbehaved")


if __name__ == "__main__":
    main()
