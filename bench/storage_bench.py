#!/usr/bin/env python
"""Benchmark of the ``storage`` package against the plainest ways to do the same work on this machine.

Every figure this script reports as a verdict is a RATIO against a baseline measured in the same run (the
same process for timings), so that disk, page cache and CPU speed of the machine cancel out:

1. Publish (local dir, ``durable=True``): ``storage.publish`` vs a raw writer that writes the same bytes, split
   into files of the same sizes as the parts, with open/write/fsync per file (publish fsyncs each part, so
   both do the same durability work), and vs ``paddle.save`` of one full file (plus an fsync, for the same
   reason; it runs once: it is slow, and above ``--skip-paddle-save-above`` GiB it is not timed at all).
2. Local load into live tensors: ``storage.load_snapshot`` (the default ``verify="stream"``, and ``"full"``,
   ``"none"``) vs a raw read of the same
   part files with ``readinto`` into ONE reused, preallocated buffer (the honest "cat": GNU ``cat f >
   /dev/null`` splices and never copies a byte to user space, so it is no baseline), and vs ``paddle.load``
   of the full file plus assigning into the target. Every file is read once before timing so the page cache
   is equally warm for every method.
3. Peak memory above the live weights, each load in a fresh subprocess: allocate and touch the target, reset
   the peak (``/proc/self/clear_refs``), load, and report ``VmHWM`` minus the RSS before the load. Chunked
   loading should stay flat (about a part at most) across sizes; ``paddle.load`` grows with the model.
4. S3 (a moto server on loopback, in its own process so it does not share the client's GIL):
   ``load_snapshot(verify="stream"|"full")`` vs a raw concurrent ``fs.cat`` of the same objects with s3fs,
   and the bytes each load fetched from the server (counted from its replies) over the snapshot's size.

GB/s are 1e9 bytes of tensor payload per second for every method, from the best of ``--repeats`` runs. The loads
and their raw baseline run interleaved, one round of every method at a time, and a load's ratio is the median
over rounds of (baseline time / its time) in the same round: the machine is shared, and a neighbour's burst then
slows both sides of a ratio. Results go to a fixed-width table and to ``bench/results/storage.json``.

    python bench/storage_bench.py                 # 0.5, 1, 2, 4 GiB local; 0.25, 0.5 GiB on S3 (~10 min)
    python bench/storage_bench.py --quick         # tiny sizes, a smoke test of every section
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `storage` imports when the script runs from anywhere
warnings.filterwarnings("ignore", category=UserWarning)  # paddle's import-time ccache notice

from common import REPO, RESULTS_DIR, log, machine_info, proc_status_bytes, reset_peak_rss, write_results  # noqa: E402

import storage  # noqa: E402
from storage.fs import open_fs  # noqa: E402
from storage.manifest import Manifest  # noqa: E402

RESULTS = RESULTS_DIR / "storage.json"
MiB, GiB = 1 << 20, 1 << 30
VERSION = "bench"
BUCKET = "baton-bench"
# section -> target ratio: throughput vs its raw baseline "at least"; peak memory / part size "at most"
TARGETS = {"publish": 0.8, "local load": 0.85, "s3 load": 0.9, "peak memory": 1.25, "s3 bytes": 1.05}
DEFAULT = "load_snapshot(default=stream)"


# ---- the state dict ---------------------------------------------------------------------------------------

def model_shapes(size_bytes: int) -> dict[str, tuple[int, ...]]:
    """A float32 transformer-shaped state dict of about ``size_bytes`` (tensors of 16-48 MiB at hidden 2048).

    The hidden size shrinks for tiny (``--quick``) sizes so at least one layer fits. Deterministic, so a
    child process rebuilds the same shapes from the size alone.
    """
    for d in (2048, 1024, 512, 256, 128):
        ffn = 11 * d // 4
        layer = 4 * (d * 3 * d + d * d + 2 * d * ffn + 2 * d)
        ends = 4 * (2 * 2 * d * d + d)  # embedding, lm head, final norm
        if ends + layer <= size_bytes or d == 128:
            break
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (2 * d, d)}
    for i in range(max(1, round((size_bytes - ends) / layer))):
        p = f"layers.{i}."
        shapes |= {p + "attn_norm.weight": (d,), p + "attn.qkv.weight": (d, 3 * d), p + "attn.out.weight": (d, d),
                   p + "mlp_norm.weight": (d,), p + "mlp.up.weight": (d, ffn), p + "mlp.down.weight": (ffn, d)}
    return shapes | {"norm.weight": (d,), "lm_head.weight": (d, 2 * d)}


def payload_of(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(4 * int(np.prod(s)) for s in shapes.values())


def make_state(shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict[str, np.ndarray]]:
    """Paddle CPU tensors filled with random floats, and flat numpy views of the same memory (for raw I/O)."""
    import paddle

    biggest = max(int(np.prod(s)) for s in shapes.values())
    pool = np.random.default_rng(0).random(biggest, dtype=np.float32)
    state, views = {}, {}
    for i, (name, shape) in enumerate(shapes.items()):
        t = paddle.empty(list(shape), dtype="float32")
        view = np.from_dlpack(t).reshape(-1)
        np.multiply(pool[: view.size], np.float32(1 + i / 1000), out=view)  # scaled copies: cheap, all distinct
        state[name], views[name] = t, view
    return state, views


def make_target(shapes: dict[str, tuple[int, ...]]) -> dict:
    """Zeroed (so touched, resident) Paddle tensors: the live weights a load writes into."""
    import paddle

    return {name: paddle.zeros(list(shape), dtype="float32") for name, shape in shapes.items()}


def assign_all(loaded: dict, target: dict) -> None:
    import paddle

    with paddle.no_grad():
        for name, t in loaded.items():
            paddle.assign(t, output=target[name])


# ---- measuring --------------------------------------------------------------------------------------------

@dataclass
class Row:
    size_gib: float
    section: str
    method: str
    payload_bytes: int
    times: list[float] = field(default_factory=list)  # every repeat, seconds
    baseline: str | None = None  # the method `ratio` compares against
    ratio: float | None = None  # throughput ratio vs baseline (memory: peak delta / part size)
    at_least: float | None = None  # the target: ratio >= at_least ...
    at_most: float | None = None  # ... or ratio <= at_most
    peak_delta_mib: float | None = None
    fetched_ratio: float | None = None  # S3: bytes fetched per load / the snapshot's bytes
    note: str = ""
    skipped: bool = False

    @property
    def seconds(self) -> float | None:
        return min(self.times) if self.times else None

    @property
    def gbps(self) -> float | None:
        return self.payload_bytes / 1e9 / self.seconds if self.seconds else None

    @property
    def meets(self) -> bool | None:
        if self.ratio is None or (self.at_least is None and self.at_most is None):
            return None
        low_ok = self.at_least is None or self.ratio >= self.at_least
        bytes_ok = self.fetched_ratio is None or self.fetched_ratio <= TARGETS["s3 bytes"]
        return low_ok and bytes_ok and (self.at_most is None or self.ratio <= self.at_most)

    def compare(self, base: Row, at_least: float | None = None) -> Row:
        """Set the throughput ratio against ``base`` (same payload, so the ratio of times)."""
        if self.seconds and base.seconds:
            self.baseline, self.ratio, self.at_least = base.method, base.seconds / self.seconds, at_least
        return self

    def to_json(self) -> dict:
        return asdict(self) | {"seconds": self.seconds, "gbps": self.gbps, "meets_target": self.meets}


def timings(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None) -> list[float]:
    """Wall time of ``fn`` ``repeats`` times; ``setup`` runs untimed before each."""
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times




def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of every ``fns`` entry, ``repeats`` rounds of one run each in turn. Each round starts one entry
    later than the one before, so no method always runs right after the same other one (a loopback S3 server's
    pause after a large reply would otherwise land on whichever method comes next, every round)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(row: Row, base: Row, at_least: float | None) -> Row:
    """``row``'s ratio as the median over interleaved rounds of base time / row time."""
    row.baseline, row.at_least = base.method, at_least
    row.ratio = float(np.median([b / t for b, t in zip(base.times, row.times)]))
    return row


def measured(rows: list[Row], row: Row) -> Row:
    rows.append(row)
    if row.skipped:
        log(f"{row.size_gib:g} GiB {row.section}: {row.method} skipped ({row.note})")
    elif row.peak_delta_mib is not None:
        log(f"{row.size_gib:g} GiB {row.section}: {row.method} peak +{row.peak_delta_mib:.1f} MiB")
    else:
        log(f"{row.size_gib:g} GiB {row.section}: {row.method} {row.seconds:.3f} s, {row.gbps:.2f} GB/s")
    return row


# ---- raw baselines ----------------------------------------------------------------------------------------

def fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(root: Path) -> Manifest:
    path = root / f"model_state.tp0.{VERSION}.manifest.json"
    return Manifest.from_json(path.read_bytes(), str(path))


def part_layout(manifest: Manifest, names: list[str]) -> list[tuple[int, list[str]]]:
    """(file size, tensor names in state-dict order) of every part, from the manifest publish wrote."""
    return [(p.bytes, [n for n in names if manifest.tensors[n].part == p.index]) for p in manifest.parts]


def raw_write(out: Path, layout: list[tuple[int, list[str]]], views: dict[str, np.ndarray]) -> None:
    """The same bytes in files of the parts' sizes (zeros where a part has its header), fsync'd like publish."""
    for index, (size, names) in enumerate(layout):
        with open(out / f"part{index}", "wb") as f:
            f.write(bytes(size - sum(views[n].nbytes for n in names)))
            for name in names:
                f.write(views[name])
            f.flush()
            os.fsync(f.fileno())
    fsync_path(out)


def page_aligned_buffer(nbytes: int) -> np.ndarray:
    """Anonymous memory starting on a page boundary, like the tensors a load writes into.

    Not ``np.empty``: a large one starts 16 bytes into a page (malloc's chunk header), and on this kind of
    machine (AMD EPYC VM) the kernel's copy into such a destination runs ~5x slower (measured 1.7 vs 9 GB/s),
    which would make the baseline look slow instead of honest.
    """
    return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)


def read_through(paths: list[Path], buf: np.ndarray) -> int:
    """Read every file to its end with ``readinto`` into the one reused ``buf``; returns bytes read.

    This is the honest 'cat': the bytes really reach user memory, as they must for a load. (GNU ``cat f >
    /dev/null`` uses splice and copies nothing, so it measures nothing useful.)
    """
    mv, total = memoryview(buf), 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(mv):
                total += n
    return total


# ---- sections ---------------------------------------------------------------------------------------------

def read_into_model(paths: list[Path], dest: np.ndarray) -> int:
    """Every file read with ``readinto`` into its own page-aligned stretch of one model-sized buffer: what a
    load into live weights must do at least (each byte lands in memory of its own, not a cache-hot buffer)."""
    offset = 0
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            mv = memoryview(dest)[offset:offset + path.stat().st_size]
            got = 0
            while n := f.readinto(mv[got:]):
                got += n
        offset += -(-got // mmap.PAGESIZE) * mmap.PAGESIZE
    return offset


def bench_publish(rows: list[Row], gib: float, work: Path, shapes: dict, state: dict, views: dict, payload: int,
                  args) -> Path:
    """Publish vs raw write vs paddle.save; leaves the published version and the full file for the loads."""
    import paddle

    pub, raw, full = work / "pub", work / "raw", work / "full.pdparams"
    publish = measured(rows, Row(gib, "publish", "storage.publish", payload, timings(
        lambda: storage.publish(state, str(pub), VERSION, part_bytes=args.part_size, durable=True),
        args.repeats, setup=lambda: shutil.rmtree(pub, ignore_errors=True))))
    layout = part_layout(read_manifest(pub), list(state))
    raw_row = measured(rows, Row(gib, "publish", "raw write+fsync", payload, timings(
        lambda: raw_write(raw, layout, views), args.repeats, setup=lambda: fresh_dir(raw)), note="part-sized files"))
    shutil.rmtree(raw)  # the loads read the published parts themselves

    def save_full(obj) -> None:
        paddle.save(obj, str(full))
        fsync_path(full)

    if gib <= args.skip_paddle_save_above:
        paddle_row = measured(rows, Row(gib, "publish", "paddle.save+fsync (one file)", payload, timings(
            lambda: save_full(state), 1), note="one run"))
        publish.note = f"{paddle_row.seconds / publish.seconds:.1f}x paddle.save"
    else:
        measured(rows, Row(gib, "publish", "paddle.save+fsync (one file)", payload, skipped=True,
                           note=f"skipped above {args.skip_paddle_save_above:g} GiB"))
        log("writing the full file for the paddle.load baselines (untimed, numpy arrays: faster to pickle)")
        save_full({name: views[name].reshape(shape) for name, shape in shapes.items()})
    publish.compare(raw_row, TARGETS["publish"])
    return pub


def bench_local_load(rows: list[Row], gib: float, work: Path, pub: Path, shapes: dict, views: dict, payload: int,
                     args) -> None:
    import paddle

    parts = sorted(pub.glob("*.part*.pdparams"))
    full = work / "full.pdparams"
    buf = page_aligned_buffer(max(p.stat().st_size for p in parts))
    read_through([*parts, full], buf)  # warm: every method finds the same files in the page cache
    target = make_target(shapes)
    dest = page_aligned_buffer(sum(-(-p.stat().st_size // mmap.PAGESIZE) * mmap.PAGESIZE for p in parts))
    dest[::mmap.PAGESIZE] = 0  # touched, like live weights

    def load(verify: str) -> Callable[[], object]:
        return lambda: storage.load_snapshot(str(pub), VERSION, into=target, verify=verify)

    times = interleaved({"raw": lambda: read_into_model(parts, dest), "one buffer": lambda: read_through(parts, buf),
                         DEFAULT: load("stream"), "full": load("full"), "none": load("none")},
                        args.repeats)
    raw = measured(rows, Row(gib, "local load", "raw readinto", payload, times["raw"],
                             note="into a model-sized buffer, as a load into weights"))
    measured(rows, Row(gib, "local load", "raw readinto, one buffer", payload, times["one buffer"],
                       note="one reused part-sized buffer: cache-hot, info"))
    loads = [measured(rows, Row(gib, "local load", method, payload, times[key]))
             for key, method in ((DEFAULT, DEFAULT), ("full", "load_snapshot(verify=full)"),
                                 ("none", "load_snapshot(verify=none)"))]
    for name, v in views.items():  # the loads really moved the bytes
        np.testing.assert_array_equal(np.from_dlpack(target[name]).reshape(-1), v, err_msg=name)
    paddle_row = measured(rows, Row(gib, "local load", "paddle.load+assign (one file)", payload, timings(
        lambda: assign_all(paddle.load(str(full)), target), args.repeats))).compare(raw)
    for row in loads:  # full reads every part twice by design (hash pass, then apply): no target for it
        paired_ratio(row, raw, TARGETS["local load"] if row.method == DEFAULT else None)
        row.note = f"{paddle_row.seconds / row.seconds:.1f}x paddle.load" + (
            "; reads twice, target untouched by a corrupt part" if "full" in row.method else "")


def bench_memory(rows: list[Row], gib: float, work: Path, pub: Path, size_bytes: int, payload: int, args) -> None:
    cases = [("chunked", DEFAULT, str(pub)),
             ("single", "paddle.load+assign (one file)", str(work / "full.pdparams"))]
    for kind, method, root in cases:
        out = subprocess.run([sys.executable, __file__, "--child", kind, "--child-root", root,
                              "--child-bytes", str(size_bytes)], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"memory child {kind!r} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        delta = got["hwm"] - got["rss_before"]
        measured(rows, Row(gib, "peak memory", method, payload, [got["seconds"]], baseline="part size",
                           ratio=delta / args.part_size, at_most=TARGETS["peak memory"] if kind == "chunked" else None,
                           peak_delta_mib=delta / MiB, note=f"{delta / payload:.2f}x model"))


def child_main(kind: str, root: str, size_bytes: int) -> None:
    """In a fresh process: peak RSS of one load above the already-resident target."""
    import paddle

    target = make_target(model_shapes(size_bytes))
    load = {
        "chunked": lambda: storage.load_snapshot(root, VERSION, into=target),
        "single": lambda: assign_all(paddle.load(root), target),
    }[kind]
    gc.collect()
    rss_before = reset_peak_rss()
    start = time.perf_counter()
    load()
    seconds = time.perf_counter() - start
    print(json.dumps({"rss_before": rss_before, "hwm": proc_status_bytes("VmHWM"), "seconds": seconds}))




@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 in a child process (our own, stopped by closing its stdin)."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", "moto"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        endpoint = proc.stdout.readline().strip()
        if not endpoint.startswith("http://"):
            raise RuntimeError(f"moto server did not start (said {endpoint!r})")
        for name in ("botocore", "aiobotocore"):  # "Found credentials ..." on every open_fs otherwise
            logging.getLogger(name).setLevel(logging.WARNING)
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_DEFAULT_REGION="us-east-1", BATON_S3_ENDPOINT=endpoint)
        fs, _ = open_fs(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        yield endpoint
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait()


def moto_child() -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop()


@contextlib.contextmanager
def counting_s3_bytes() -> Iterator[list[int]]:
    """Body bytes of every GetObject reply s3fs receives meanwhile (manifest and header probes included)."""
    import s3fs

    fetched: list[int] = []
    real = s3fs.S3FileSystem._call_s3

    async def counting(self, method, *args, **kwargs):
        out = await real(self, method, *args, **kwargs)
        if method == "get_object":
            fetched.append(int(out.get("ContentLength", 0)))
        return out

    s3fs.S3FileSystem._call_s3 = counting
    try:
        yield fetched
    finally:
        s3fs.S3FileSystem._call_s3 = real


def s3_cat(root_url: str, files: list[str]) -> int:
    """Raw baseline: every part fetched concurrently in one s3fs ``cat`` (all of them in memory at once)."""
    fs, root = open_fs(root_url)
    return sum(len(b) for b in fs.cat([f"{root}/{f}" for f in files]).values())


def bench_s3(rows: list[Row], args) -> None:
    with moto_server():
        for gib in args.s3_sizes:
            shapes = model_shapes(int(gib * GiB))
            state, _ = make_state(shapes)
            payload = payload_of(shapes)
            url = f"s3://{BUCKET}/size{int(gib * GiB)}"
            measured(rows, Row(gib, "s3 load", "storage.publish to s3", payload, timings(
                lambda: storage.publish(state, url, VERSION, part_bytes=args.part_size), 1), note="one run, info"))
            fs, root = open_fs(url)
            manifest = fs.cat_file(f"{root}/model_state.tp0.{VERSION}.manifest.json")
            files = [p.file for p in Manifest.from_json(manifest, url).parts]
            target = make_target(shapes)
            snapshot = sum(fs.size(f"{root}/{f}") for f in files)
            methods = {DEFAULT: "stream", "load_snapshot(verify=full)": "full"}
            fetched = {}
            for method, verify in methods.items():
                with counting_s3_bytes() as got:
                    storage.load_snapshot(url, VERSION, into=target, verify=verify)
                fetched[method] = sum(got) / snapshot

            def load(verify: str) -> Callable[[], object]:
                return lambda: storage.load_snapshot(url, VERSION, into=target, verify=verify)

            times = interleaved({"raw": lambda: s3_cat(url, files)} | {m: load(v) for m, v in methods.items()},
                                args.repeats)
            raw = measured(rows, Row(gib, "s3 load", "raw s3fs cat", payload, times["raw"],
                                     note="all parts concurrently"))
            for method, verify in methods.items():
                row = paired_ratio(measured(rows, Row(gib, "s3 load", method, payload, times[method],
                                                      fetched_ratio=fetched[method])), raw, TARGETS["s3 load"])
                row.note = (f"fetched {fetched[method]:.3f}x the snapshot (target <= {TARGETS['s3 bytes']}x)"
                            + ("; spooled to local disk, hashed before the first write" if verify == "full" else ""))
            fs.rm(root, recursive=True)
            state = target = None  # drop the references (not `del`: the closures above refer to these names)
            gc.collect()


def bench_local(rows: list[Row], args, tmp: Path) -> None:
    for gib in args.sizes:
        size_bytes = int(gib * GiB)
        work = tmp / f"size{size_bytes}"
        work.mkdir()
        shapes = model_shapes(size_bytes)
        state, views = make_state(shapes)
        payload = payload_of(shapes)
        log(f"{gib:g} GiB: {len(state)} tensors, {payload / GiB:.3f} GiB payload")
        pub = bench_publish(rows, gib, work, shapes, state, views, payload, args)
        bench_local_load(rows, gib, work, pub, shapes, views, payload, args)
        del state, views
        gc.collect()
        bench_memory(rows, gib, work, pub, size_bytes, payload, args)
        shutil.rmtree(work)


# ---- report -----------------------------------------------------------------------------------------------

def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def target_text(row: Row) -> str:
    if row.at_least is not None:
        return f">= {row.at_least:.2f}x"
    if row.at_most is not None:
        return f"<= {row.at_most:.2f}x part"
    return ""


def ordered(rows: list[Row]) -> list[Row]:
    """Measurement order, except that within one size and section the baselines come before what they judge."""
    group = {(r.size_gib, r.section): i for i, r in reversed(list(enumerate(rows)))}
    return sorted(rows, key=lambda r: (group[r.size_gib, r.section], bool(target_text(r))))


def table(rows: list[Row]) -> str:
    head = (f"{'GiB':>6}  {'section':<11}  {'method':<30}  {'best s':>8}  {'GB/s':>6}  {'peak+MiB':>8}  "
            f"{'ratio':>6}  {'vs':<16}  {'target':<14}  {'verdict':<7}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = {True: "ok", False: "MISSES", None: ""}[r.meets] if not r.skipped else "skipped"
        lines.append(
            f"{r.size_gib:>6g}  {r.section:<11}  {r.method:<30}  {fmt(r.seconds, '.3f'):>8}  {fmt(r.gbps, '.2f'):>6}  "
            f"{fmt(r.peak_delta_mib, '.1f'):>8}  {fmt(r.ratio, '.2f'):>6}  {r.baseline or '':<16}  "
            f"{target_text(r):<14}  {verdict:<7}  {r.note}".rstrip())
    return "\n".join(lines)






# ---- command line -----------------------------------------------------------------------------------------

def gib_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=gib_list, help="local state dict sizes, GiB (default 0.5,1,2,4; --quick 0.0625)")
    p.add_argument("--s3-sizes", type=gib_list, help="S3 state dict sizes, GiB (default 0.25,0.5; --quick 0.0625)")
    p.add_argument("--part-size", type=float, help="part size for publish, MiB (default 128; --quick 16)")
    p.add_argument("--skip-paddle-save-above", type=float, default=1.0, metavar="GIB",
                   help="do not time paddle.save for sizes above this many GiB (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement, best kept (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of every section")
    p.add_argument("--no-s3", action="store_true", help="skip the S3 section")
    p.add_argument("--tmp", default="/tmp", help="where the scratch directory goes (default /tmp)")
    p.add_argument("--out", type=Path, help=f"JSON results (default {RESULTS.relative_to(REPO)}; "
                   "with --quick, a temp file, so a smoke run never replaces the committed figures)")
    p.add_argument("--child", choices=["chunked", "single", "moto"], help=argparse.SUPPRESS)
    p.add_argument("--child-root", help=argparse.SUPPRESS)
    p.add_argument("--child-bytes", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = args.sizes or ([0.0625] if args.quick else [0.5, 1.0, 2.0, 4.0])
    args.s3_sizes = args.s3_sizes or ([0.0625] if args.quick else [0.25, 0.5])
    args.out = args.out or (Path(tempfile.gettempdir()) / "storage.quick.json" if args.quick else RESULTS)
    args.part_size = int((args.part_size or (16 if args.quick else 128)) * MiB)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child == "moto":
        return moto_child()
    if args.child:
        return child_main(args.child, args.child_root, args.child_bytes)
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="baton-bench-", dir=args.tmp))
    started = time.perf_counter()
    try:
        bench_local(rows, args, tmp)
        if not args.no_s3:
            bench_s3(rows, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = ordered(rows)
    print(table(rows))
    doc = {
        "machine": machine_info(),
        "config": {"sizes_gib": args.sizes, "s3_sizes_gib": [] if args.no_s3 else args.s3_sizes,
                   "part_size_bytes": args.part_size, "repeats": args.repeats, "quick": args.quick,
                   "skip_paddle_save_above_gib": args.skip_paddle_save_above},
        "targets": {"publish": f"storage.publish >= {TARGETS['publish']}x raw write+fsync",
                    "local load": f"load_snapshot >= {TARGETS['local load']}x raw readinto",
                    "s3 load": f"load_snapshot >= {TARGETS['s3 load']}x raw s3fs cat",
                    "s3 bytes": f"bytes fetched per load <= {TARGETS['s3 bytes']}x the snapshot",
                    "peak memory": f"chunked load peak above live weights <= {TARGETS['peak memory']}x part size"},
        "total_seconds": time.perf_counter() - started,
        "rows": [r.to_json() for r in rows],
    }
    write_results(args.out, doc)


if __name__ == "__main__":
    main()
