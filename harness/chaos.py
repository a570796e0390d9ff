"""Fault injection: real processes killed with SIGKILL, real bytes flipped, real storage and Prefect servers killed,
and for each fault whether anything was lost or corrupted (the goal is 0).

Scenarios (each fault is injected for real, nothing is mocked):

1. A publisher SIGKILLed at random moments, on local disk and on a loopback S3 server (moto, its own process):
   afterwards every committed version loads bit-exact, every uncommitted one is refused (no torn load), and
   every version committed before the kill still loads (nothing lost).
2. Every byte of a small snapshot (4 parts and the manifest) flipped, one at a time, and loaded into Paddle
   tensors pre-filled with a sentinel, with ``verify="full"`` and ``verify="stream"``.
3. ``baton serve`` SIGKILLed in the middle of ``POST /v1/update_weights``, then restarted with the same command
   line: it must serve one complete version, bit-exact (digest and seeded tokens).
4. The S3 server SIGKILLed in the middle of an update: a clear non-2xx, the old version still serving (or, if
   the write had begun, nothing served rather than a torn model); after S3 is back, an update succeeds.
5. ``prune`` racing loads; a part replaced (in place, by rename, or as an S3 object) during loads.
6. The Prefect server killed and restarted during a ``sync-weights`` run; the rerun must converge.

Outcomes per check: *succeeded* (the operation did what it should, bit-exact), *refused-clean* (an error, and
the target or served weights are bit-identical to before), *harmless* (a corrupted byte that changes nothing a
load returns: loaded bit-exact), *detected-partial* (``PartialApplyError`` naming every changed tensor, or a
server that stops serving rather than serve a torn model: the caller must restore), *BAD* (anything else: a
torn load, a lost version, weights changed under an error, an exception that is not a storage error).

The scenarios run from ``bench/chaos.py`` (every one, with the report) and from ``tests/test_chaos.py`` (the fast
cases).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from unittest import mock
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
warnings.filterwarnings("ignore", category=UserWarning)

import numpy as np  # noqa: E402

import storage  # noqa: E402
from harness.launch import free_port, log, wait_until  # noqa: E402

BUCKET = "baton-chaos"
KINDS = ("succeeded", "refused_clean", "harmless", "partial", "bad")
STORAGE_ERRORS = (storage.SnapshotError, OSError)


# ---- bookkeeping ---------------------------------------------------------------------------------------------

@dataclass
class Tally:
    """One scenario's faults and the outcome of every check made after them; BAD keeps its first examples so the
    report says exactly what went wrong."""

    scenario: str
    faults: int = 0
    counts: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    bad_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, kind: str, detail: str = "") -> None:
        assert kind in KINDS, kind
        self.counts[kind] += 1
        if kind == "bad" and len(self.bad_examples) < 10:
            self.bad_examples.append(detail)

    def note(self, what: str, n: int = 1) -> None:
        self.notes[what] += n

    @property
    def checks(self) -> int:
        return sum(self.counts.values())

    @property
    def bad(self) -> int:
        return self.counts["bad"]

    def to_json(self) -> dict:
        return {"scenario": self.scenario, "faults": self.faults, "checks": self.checks,
                **{k: self.counts[k] for k in KINDS}, "notes": dict(self.notes.most_common()),
                "bad_examples": self.bad_examples, "seconds": round(self.seconds, 1)}


@contextlib.contextmanager
def timed(tally: Tally) -> Iterator[Tally]:
    start = time.perf_counter()
    try:
        yield tally
    finally:
        tally.seconds += time.perf_counter() - start
        log(f"{tally.scenario}: {tally.faults} faults, {dict(tally.counts)}, {tally.seconds:.0f}s")


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---- bytes of targets and versions ----------------------------------------------------------------------------

def host_bytes(t) -> np.ndarray:
    """A writable flat byte view of a CPU Paddle tensor (or numpy array): to read and to reset targets exactly."""
    if isinstance(t, np.ndarray):
        return t.reshape(-1).view(np.uint8)
    import paddle

    v = t.detach()
    if v.dtype == paddle.bfloat16:
        v = v.view(paddle.uint16)
    return np.from_dlpack(v).reshape(-1).view(np.uint8)


def bytes_of(state: dict) -> dict[str, bytes]:
    return {name: host_bytes(t).tobytes() for name, t in state.items()}


def fill(target: dict, raw: dict[str, bytes]) -> None:
    for name, data in raw.items():
        host_bytes(target[name])[:] = np.frombuffer(data, np.uint8)


def paddle_target(state: dict, sentinel: int = 0xA5) -> tuple[dict, dict[str, bytes]]:
    """Paddle tensors shaped like ``state`` holding a sentinel byte pattern (no published version looks like it),
    and that pattern, to tell "untouched" from "written" exactly."""
    import paddle

    target = {}
    for name, t in state.items():
        dtype = str(t.dtype).removeprefix("paddle.")
        target[name] = paddle.zeros(list(t.shape), dtype=dtype)
    pattern = {name: bytes([sentinel]) * host_bytes(t).nbytes for name, t in target.items()}
    fill(target, pattern)
    return target, pattern


def judge_load(load: Callable[[], object], target: dict, versions: dict[str, dict[str, bytes]]) -> tuple[str, str]:
    """Runs one load into ``target`` and classifies it: success must leave exactly one published version; an error
    must leave the target as it was, except a ``PartialApplyError`` whose ``applied`` covers every change."""
    before = bytes_of(target)
    try:
        load()
    except storage.PartialApplyError as exc:
        changed = {n for n, b in bytes_of(target).items() if b != before[n]}
        missing = changed - set(exc.applied)
        if missing:
            return "bad", f"PartialApplyError does not name changed tensors {sorted(missing)}: {exc}"
        return "partial", "PartialApplyError"
    except STORAGE_ERRORS as exc:
        if bytes_of(target) != before:
            return "bad", f"target changed under {type(exc).__name__}: {str(exc)[:300]}"
        return "refused_clean", type(exc).__name__
    except Exception as exc:  # noqa: BLE001 - anything else is itself a finding
        return "bad", f"unexpected {type(exc).__module__}.{type(exc).__name__}: {str(exc)[:300]}"
    after = bytes_of(target)
    for version, expected in versions.items():
        if after == expected:
            return "succeeded", version
    return "bad", "load returned success but the target holds no published version (torn load)"


def version_id(k: int) -> str:
    return f"p{k:05d}"


@lru_cache(maxsize=256)
def version_state(k: int, scale: int) -> dict[str, np.ndarray]:
    """Version ``k``'s tensors (about 6.4 KB per ``scale``), the same in every process: publishers and checkers
    derive the expected bytes from ``k`` alone. Several dtypes, and two same-shaped layers."""
    rng = np.random.default_rng(k)
    n = 16 * scale
    return {
        "embed.weight": rng.standard_normal((n, 64), np.float32),
        "layers.0.w": rng.standard_normal((n, 32)).astype(np.float16),
        "layers.1.w": rng.standard_normal((n, 32)).astype(np.float16),
        "ids": rng.integers(0, 1 << 40, n, dtype=np.int64),
        "mask": rng.integers(0, 255, n * 8, dtype=np.uint8),
        "odd": rng.standard_normal((3, 5, 7), np.float32),
    }


def expected(k: int, scale: int) -> dict[str, bytes]:
    return {name: a.tobytes() for name, a in version_state(k, scale).items()}


def publish_forever(root: str, first: int, scale: int, part_bytes: int) -> None:
    """What a killed publisher runs: versions ``first``, ``first + 1``, … back to back until it is killed. It
    says "started" once its storage connection is warm (one publish elsewhere), so kill moments are drawn over
    publishing, not set-up."""
    storage.publish(version_state(0, scale), root + "-warm", "warm", part_bytes=part_bytes, overwrite=True)
    os.write(1, f"started {os.getpid()}\n".encode())
    for k in range(first, first + 1000):
        storage.publish(version_state(k, scale), root, version_id(k), part_bytes=part_bytes, durable=True)


# ---- a loopback S3 server that can be killed ------------------------------------------------------------------

class Child:
    """A server this benchmark started: killed (SIGKILL, the fault) or stopped (SIGTERM, then SIGKILL)."""

    proc: subprocess.Popen | None = None

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class MotoS3(Child):
    """moto's S3 server in its own process on a fixed port, so a SIGKILL really takes storage away and a restart
    brings it back at the same endpoint (empty: moto keeps objects in memory)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "BATON_S3_ENDPOINT": self.endpoint}

    def start(self) -> MotoS3:
        import urllib.request

        os.environ.update(self.env())
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: urllib.request.urlopen(self.endpoint, timeout=2).status == 200, 60, "moto S3 server")
        fs, _ = storage.open_fs(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        return self



@contextlib.contextmanager
def moto_s3() -> Iterator[MotoS3]:
    """The server, with the environment that points storage at it put back as it was afterwards."""
    s3 = MotoS3()
    with mock.patch.dict(os.environ):  # start() points the environment at it
        try:
            yield s3.start()
        finally:
            s3.stop()


# ---- 1. publishers killed at random moments ---------------------------------------------------------------------

# Forks a publisher per request: each killed publisher is a real process, without paying Python's start-up for
# every one of 50 kills. The zygote has no threads and no storage connections when it forks.
_ZYGOTE = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from harness import chaos
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps killed children
for line in sys.stdin:
    root, first, scale, part = line.split()
    if os.fork() == 0:
        chaos.publish_forever(root, int(first), int(scale), int(part))
        os._exit(0)
"""


@contextlib.contextmanager
def publisher_zygote() -> Iterator[Callable[[str, int, int, int], int]]:
    """``spawn(root, first, scale, part_bytes) -> pid`` of a fresh publisher process."""
    proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(REPO)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO)

    def spawn(root: str, first: int, scale: int, part: int) -> int:
        proc.stdin.write(f"{root} {first} {scale} {part}\n")
        proc.stdin.flush()
        if not select.select([proc.stdout], [], [], 60)[0]:
            raise RuntimeError(f"no publisher started for {root}")
        word, pid = proc.stdout.readline().split()  # the child's "started PID"
        return int(pid)

    try:
        yield spawn
    finally:
        proc.stdin.close()
        proc.wait(30)


def kill_stage(names: set[str], k: int) -> str:
    """Where the publish of version ``k`` was when the kill landed, from the files it left."""
    base = f"model_state.tp0.{version_id(k)}"
    manifest, marker = f"{base}.manifest.json" in names, f"{base}.publishing" in names
    parts = sum(1 for n in names if n.startswith(base + ".part"))
    if manifest:
        return "after the manifest, marker not yet removed" if marker else "between publishes"
    if marker:
        return f"mid-publish ({parts} part files written)" if parts else "marker written, no part yet"
    return "before its first write" if not parts else f"parts without marker or manifest ({parts})"


def check_version(root: str, k: int, scale: int, committed: bool, target: dict, pattern: dict) -> tuple[str, str]:
    """A committed version must load bit-exact; an uncommitted one must be refused with the target untouched."""
    fill(target, pattern)
    kind, detail = judge_load(lambda: storage.load_snapshot(root, version_id(k), into=target), target,
                              {version_id(k): expected(k, scale)})
    if committed and kind != "succeeded":
        return "bad", f"lost: committed {version_id(k)} does not load ({kind}: {detail})"
    if not committed and kind == "succeeded":
        return "bad", f"torn: uncommitted {version_id(k)} loaded"
    return kind, detail


def publisher_kills(tally: Tally, root: str, kills: int, rng: random.Random, scale: int = 160,
                    part_bytes: int = 256 << 10, sweep_max: int = 1000) -> None:
    """SIGKILLs ``kills`` publishers at uniformly random moments of a back-to-back publish loop, and after each
    checks every version it touched plus the newest one committed before it; at the end, up to ``sweep_max``
    of all the committed versions again."""
    fs, path = storage.open_fs(root)
    for _ in range(2):  # the second one is warm, as a publisher's are once connected
        start = time.perf_counter()
        storage.publish(version_state(0, scale), root + "-warm", "warm", part_bytes=part_bytes, overwrite=True)
    window = 2.0 * (time.perf_counter() - start)  # kills fall anywhere in a publish and the start of the next
    target, pattern = paddle_target(version_state(0, scale))
    committed: list[int] = []
    k = 0
    with publisher_zygote() as spawn:
        for _ in range(kills):
            pid = spawn(root, k, scale, part_bytes)
            time.sleep(rng.uniform(0, window))
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: gone(pid), 10, f"killed publisher {pid}", 0.002)
            tally.faults += 1
            names = set(storage.listing(fs, path))
            last = k
            while any(n.startswith(f"model_state.tp0.{version_id(last + 1)}.") for n in names):
                last += 1
            tally.note(f"killed: {kill_stage(names, last)}")
            earlier = committed[-1] if committed else None
            for j in range(k, last + 1):
                done = f"model_state.tp0.{version_id(j)}.manifest.json" in names
                tally.add(*check_version(root, j, scale, done, target, pattern))
                if done:
                    committed.append(j)
            if earlier is not None:
                tally.add(*check_version(root, earlier, scale, True, target, pattern))
            k = last + 1 if f"model_state.tp0.{version_id(last)}.manifest.json" in names else last
    sweep = committed[:: max(1, len(committed) // sweep_max)]
    for j in sweep:  # nothing committed before any of the kills was lost
        tally.add(*check_version(root, j, scale, True, target, pattern))
    tally.note(f"versions committed across the kills: {len(committed)}, {len(sweep)} loaded again at the end")


# ---- 2. byte flips ----------------------------------------------------------------------------------------------

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


# ---- servers ------------------------------------------------------------------------------------------------------

SAMPLE = {"prompt": "The policy", "max_tokens": 6, "temperature": 0.8, "seed": 7}


def publish_pair(config, root: str, part_bytes: int = 8 << 20, durable: bool = True) -> dict[str, str]:
    """Publishes v1 (seed 1) and v2 (seed 2) of ``config`` under ``root``; returns each one's digest computed here
    from the published arrays (the server digests its live weights the same way): the proof of what a server
    holds, bit for bit."""
    from infer.model import random_state_dict
    from infer.weights import state_digest

    digests = {}
    for version, seed in (("v1", 1), ("v2", 2)):
        state = random_state_dict(config, seed)
        storage.publish(state, root, version, part_bytes=part_bytes, overwrite=True, durable=durable)
        digests[version] = state_digest(state)
        del state
    return digests


def weights_of(url: str) -> dict | None:
    import httpx

    try:
        return httpx.get(f"{url}/v1/weights", timeout=30).json()
    except (httpx.HTTPError, ValueError):
        return None


def sample_tokens(url: str, max_tokens: int = 6) -> tuple[int, list[int] | None, str | None]:
    """A seeded completion: (status, token ids, weight version)."""
    import httpx

    r = httpx.post(f"{url}/v1/completions", json=SAMPLE | {"max_tokens": max_tokens}, timeout=120)
    if r.status_code != 200:
        return r.status_code, None, None
    body = r.json()
    return 200, body["choices"][0]["token_ids"], body["weight_version"]


def judge_server(url: str, digests: dict[str, str], tokens: dict[str, list[int]],
                 max_tokens: int = 6) -> tuple[str, str]:
    """What a server serves after a fault: one complete version (digest of the live weights equals that version's
    offline digest, and a seeded completion returns that version's tokens), or nothing at all (unhealthy, every
    completion refused). ``tokens`` learns each version's tokens the first time its digest is proven."""
    info = weights_of(url)
    if info is None:
        return "bad", "GET /v1/weights did not answer"
    status, ids, version = sample_tokens(url, max_tokens)
    if info.get("version") is None:
        if info.get("healthy") is False and status == 503:
            return "partial", f"serving nothing, unhealthy: {str(info.get('problem'))[:200]}"
        return "bad", f"no version but completion answered {status}"
    v = info["version"]
    if v not in digests or info.get("digest") != digests[v]:
        return "bad", f"serves {v!r} with digest {info.get('digest')} that is no published version's"
    if status != 200 or version != v:
        return "bad", f"weights say {v} but a completion answered {status} from {version!r}"
    if tokens.setdefault(v, ids) != ids:
        return "bad", f"{v}: seeded tokens {ids} differ from {tokens[v]} served earlier by the same weights"
    return "succeeded", v


def post_update(url: str, version: str, box: dict) -> None:
    """``POST /v1/update_weights`` whose reply (or transport error) lands in ``box``."""
    import httpx

    try:
        box["reply"] = httpx.post(f"{url}/v1/update_weights", json={"version": version}, timeout=300)
    except httpx.HTTPError as exc:
        box["error"] = f"{type(exc).__name__}: {exc}"


def kill_during_update(url: str, version: str, delay: float, kill: Callable[[], None],
                       writing: bool = False) -> dict:
    """Starts an update to ``version``, waits until the server says it is loading it (with ``writing``: until it
    has begun writing the live weights, when ``GET /v1/weights`` shows no version), waits ``delay`` more, then
    ``kill()``. Returns the box with the update's reply (or transport error) and whether the kill came first."""
    box: dict = {}
    worker = threading.Thread(target=post_update, args=(url, version, box))
    worker.start()

    def reached() -> bool:
        info = weights_of(url) or {}
        return info.get("updating") == version and (not writing or info.get("version") is None)

    seen = True
    try:
        wait_until(lambda: "reply" in box or reached(), 30, "update in progress", 0.002)
    except RuntimeError:
        seen = False
    time.sleep(delay)
    box["killed_before_reply"] = "reply" not in box and seen
    kill()
    worker.join(300)
    return box


def calibrate_update(url: str, there: str, back: str) -> float:
    """Seconds an update takes on this server (server-side, the mean of a round trip), to spread kills over it."""
    import httpx

    seconds = []
    for v in (there, back):
        r = httpx.post(f"{url}/v1/update_weights", json={"version": v}, timeout=300)
        if r.status_code != 200:
            raise RuntimeError(f"calibration update to {v} failed: {r.status_code} {r.text[:300]}")
        seconds.append(r.json()["seconds"])
    return sum(seconds) / len(seconds)


# ---- 3. baton serve killed mid-update ----------------------------------------------------------------------------

def server_kills(tally: Tally, workdir: Path, trials: int, model: str, rng: random.Random,
                 part_bytes: int = 64 << 20, spread: float = 0.95, writing: bool = False) -> None:
    """SIGKILLs ``baton serve`` at a random moment of an update, restarts it with the same command line (same port)
    and checks it serves one complete version. Even trials run the README's command (no ``--version``: the newest
    committed, v2) and update to v1; odd ones pin ``--version v1`` and update to v2. The kill comes a random
    ``0..spread`` of the update's duration after the server reports the update in progress (with ``writing``:
    after it has begun writing the live weights)."""
    from infer.config import get_config
    from harness.launch import baton_serve

    root = str(workdir / "server-kill")
    digests = publish_pair(get_config(model), root, part_bytes=part_bytes, durable=False)
    tokens: dict[str, list[int]] = {}
    port, window = free_port(), None
    for t in range(trials):
        pinned = t % 2 == 1
        args = ["--model", model, "--port", str(port), *(["--version", "v1"] if pinned else [])]
        start, goal = ("v1", "v2") if pinned else ("v2", "v1")
        with baton_serve(root, *args, timeout=300) as server:
            before = judge_server(server.url, digests, tokens, max_tokens=2)
            if before != ("succeeded", start):
                tally.add("bad", f"before the kill: {before}")
                continue
            if window is None:
                window = calibrate_update(server.url, goal, start)
            box = kill_during_update(server.url, goal, rng.uniform(0, spread * window),
                                     lambda: os.kill(server.pid, signal.SIGKILL), writing)
        tally.faults += 1
        tally.note("killed mid-update" if box["killed_before_reply"] else "update answered before the kill")
        with baton_serve(root, *args, timeout=300) as server:
            kind, detail = judge_server(server.url, digests, tokens, max_tokens=2)
        tally.add(kind, detail)
        if kind == "succeeded":
            how = "--version v1" if pinned else "no --version (newest)"
            tally.note(f"restarted with {how}: serves {detail}, was serving {start} before the killed update")
    tally.note(f"update window {window or 0:.2f}s ({model})")


# ---- 4. the S3 server killed mid-load ------------------------------------------------------------------------------

def s3_kills(tally: Tally, trials: int, model: str, rng: random.Random, down_checks: bool = True) -> dict:
    """Serves v1 from the loopback S3 server, SIGKILLs that server at a random moment of an update to v2 (even
    trials while it verifies checksums, odd ones while it writes the live weights), and checks the answer is a
    clear non-2xx with v1 still serving bit-exact (or nothing served, when the write had begun).
    With storage still down another update must be answered 503. Then S3 comes back (empty: v1 and v2 are
    published again) and an update to v2 must succeed. Returns the HTTP statuses seen."""
    from infer.config import get_config
    from harness.launch import baton_serve
    import httpx

    statuses: dict[str, list[int]] = {"killed": [], "down": [], "after": []}
    config = get_config(model)
    with moto_s3() as s3:
        root = f"s3://{BUCKET}/s3-kill"
        digests = publish_pair(config, root)
        tokens: dict[str, list[int]] = {}
        # one attempt per request: without it botocore retries a refused connection for several seconds
        with baton_serve(root, "--model", model, "--version", "v1", env={"AWS_MAX_ATTEMPTS": "1"},
                         timeout=300) as server:
            window = calibrate_update(server.url, "v2", "v1")
            tally.note(f"update window {window:.2f}s ({model}, verify=full downloads twice)")
            for t in range(trials):
                if judge_server(server.url, digests, tokens) != ("succeeded", "v1"):
                    tally.add("bad", "not serving v1 before the kill")
                    break
                # even trials kill during the checksum pass, odd ones once the live weights are being written
                writing = t % 2 == 1
                box = kill_during_update(server.url, "v2", rng.uniform(0, 0.3 * window), s3.kill, writing)
                tally.note("killed while writing" if writing else "killed while checking")
                tally.faults += 1
                reply = box.get("reply")
                code = reply.status_code if reply is not None else None
                statuses["killed"].append(code)
                tally.note(f"update answered {code}" + ("" if box["killed_before_reply"] else " (before the kill)"))
                state = judge_server(server.url, digests, tokens)
                tally.add(*_after_s3_kill(code, box, state))
                if state[0] == "partial":
                    tally.note(f"{code}: {reply.json().get('message', '')[:160]}")
                if down_checks:
                    r = httpx.post(f"{server.url}/v1/update_weights", json={"version": "v2"}, timeout=300)
                    statuses["down"].append(r.status_code)
                    tally.note(f"update while S3 is down answered {r.status_code}")
                    tally.add(*_unchanged(judge_server(server.url, digests, tokens), state))
                s3.start()
                publish_pair(config, root)
                r = httpx.post(f"{server.url}/v1/update_weights", json={"version": "v2"}, timeout=300)
                statuses["after"].append(r.status_code)
                after = judge_server(server.url, digests, tokens)
                tally.add(*(after if r.status_code == 200 and after == ("succeeded", "v2") else
                            ("bad", f"after S3 came back the update answered {r.status_code}: {r.text[:300]}")))
                httpx.post(f"{server.url}/v1/update_weights", json={"version": "v1"}, timeout=300)
    return statuses


def _after_s3_kill(code: int | None, box: dict, state: tuple[str, str]) -> tuple[str, str]:
    """The update S3 died under: 200 with v2 served exactly, or a clear 4xx/5xx with v1 served exactly (or, once
    the write had begun in place, nothing served)."""
    kind, detail = state
    if code == 200:
        return ("succeeded", "v2") if state == ("succeeded", "v2") else ("bad", f"200 but {kind}: {detail}")
    if code is None or not 400 <= code < 600:
        return "bad", f"no clear answer: {box.get('error')}"
    if kind == "succeeded":
        return ("refused_clean", f"{code}, v1 serving") if detail == "v1" else ("bad", f"{code} yet serving {detail}")
    return kind, f"{code}: {detail}"


def _unchanged(now: tuple[str, str], before: tuple[str, str]) -> tuple[str, str]:
    """An update refused while storage is down must leave the server exactly as the fault left it."""
    if now[0] == before[0] == "partial":
        return "partial", "still serving nothing"
    if now == before:
        return "refused_clean", f"still serving {now[1]}"
    return "bad", f"a refused update while S3 was down changed what is served: {before} -> {now}"


# ---- 5. prune racing loads; a part replaced during loads -------------------------------------------------------

_RACER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import storage
from harness import chaos
root, scale, part, keep = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
k = 0
while True:
    storage.publish(chaos.version_state(k, scale), root, chaos.version_id(k), part_bytes=part, durable=False)
    if k == 0:
        print("ready", flush=True)
    storage.prune(root, keep_last=keep)
    k += 1
"""


@contextlib.contextmanager
def racing(script: str, *args: str) -> Iterator[subprocess.Popen]:
    """A helper process that races the loads; SIGKILLed at the end (it may be mid-write, as a fault would leave it)."""
    proc = subprocess.Popen([sys.executable, "-c", script, str(REPO), *args], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
    try:
        proc.stdout.readline()  # its first write is done: there is something to race
        yield proc
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def prune_race(tally: Tally, root: str, loads: int, verify: str, scale: int = 32, part_bytes: int = 48 << 10,
               max_seconds: float = 120) -> None:
    """Loads the oldest listed version again and again while another process publishes a new one and prunes to
    the newest two after each publish: every load is bit-exact or refused; afterwards the newest version loads."""
    target, pattern = paddle_target(version_state(0, scale))
    deadline = time.monotonic() + max_seconds
    with racing(_RACER, root, str(scale), str(part_bytes), "2"):
        while tally.checks < loads and time.monotonic() < deadline:
            try:
                versions = storage.list_versions(root)
            except Exception as exc:  # noqa: BLE001 - listing while a prune deletes manifests
                tally.note(f"list_versions raised {type(exc).__name__}")
                continue
            if not versions:
                tally.note("no version listed")
                time.sleep(0.01)
                continue
            k = int(versions[0].id[1:])
            fill(target, pattern)
            tally.faults += 1
            kind, detail = judge_load(lambda: storage.load_snapshot(root, versions[0].id, into=target, verify=verify),
                                      target, {versions[0].id: expected(k, scale)})
            tally.add(kind, detail)
            if kind != "succeeded":
                tally.note(f"{kind}: {detail}")
    newest = storage.list_versions(root)[-1].id
    fill(target, pattern)
    kind, detail = judge_load(lambda: storage.load_snapshot(root, newest, into=target, verify=verify), target,
                              {newest: expected(int(newest[1:]), scale)})
    tally.add(kind if kind == "succeeded" else "bad", f"rerun after the race: {kind} {detail}")
    tally.note(f"rerun after the race: {kind}")


_REWRITER = """
import os, random, sys, time
sys.path.insert(0, sys.argv[1])
import storage
root, mode, count = sys.argv[2], sys.argv[3], int(sys.argv[4])
fs, path = storage.open_fs(root)
names = [f"model_state.tp0.p00001.part{i}.pdparams" for i in range(count)]
mine = [fs.cat_file(f"{path}/{n}") for n in names]
theirs = [fs.cat_file(f"{path}/{n.replace('p00001', 'p00002')}") for n in names]

def put(i, data):
    target = f"{path}/{names[i]}"
    if mode == "overwrite":  # the same inode, rewritten from byte 0
        with open(target, "r+b") as f:
            f.write(data)
    elif mode == "rename":  # a new file renamed over the old one
        with open(target + ".tmp", "wb") as f:
            f.write(data)
        os.replace(target + ".tmp", target)
    else:  # an object store: a new object under the same key
        fs.pipe_file(target, data)

print("ready", flush=True)
rng = random.Random(7)
while True:
    i = rng.randrange(count)
    put(i, theirs[i])
    time.sleep(rng.uniform(0, 0.002))
    put(i, mine[i])
    time.sleep(rng.uniform(0, 0.004))
"""


def replace_race(tally: Tally, root: str, mode: str, loads: int, verify: str, scale: int = 48,
                 part_bytes: int = 64 << 10) -> None:
    """Loads version p00001 again and again while another process swaps one of its parts for the same part of
    p00002 (same size, same header, other data) and back: every load is p00001 bit-exact, refused, or a
    ``PartialApplyError`` naming every changed tensor; once the writer stops, the load succeeds again."""
    for k in (1, 2):
        storage.publish(version_state(k, scale), root, version_id(k), part_bytes=part_bytes, overwrite=True)
    count = len(storage.resolve(root, version_id(1)).files)
    target, pattern = paddle_target(version_state(1, scale))
    want = {version_id(1): expected(1, scale)}
    with racing(_REWRITER, root, mode, str(count)):
        for _ in range(loads):
            fill(target, pattern)
            tally.faults += 1
            kind, detail = judge_load(lambda: storage.load_snapshot(root, version_id(1), into=target, verify=verify),
                                      target, want)
            tally.add(kind, detail)
            if kind != "succeeded":
                tally.note(f"{kind}: {detail[:80]}")
    storage.publish(version_state(1, scale), root, version_id(1), part_bytes=part_bytes, overwrite=True)
    fill(target, pattern)
    kind, detail = judge_load(lambda: storage.load_snapshot(root, version_id(1), into=target, verify=verify),
                              target, want)
    tally.add(kind if kind == "succeeded" else "bad", f"load after the writer stopped: {kind} {detail}")


# ---- 6. Prefect server restarted during sync-weights ---------------------------------------------------------------

_SYNC = """
import json, sys
from flows.sync import sync_weights
sync_weights(version=sys.argv[1], snapshot_root=sys.argv[2], servers=json.loads(sys.argv[3]), source=sys.argv[4],
             part_bytes=16 << 20)
print("SYNC-COMPLETED", flush=True)
"""


class PrefectServer(Child):
    """``prefect server start`` on 127.0.0.1 with its database in ``home``: killed and started again at the same
    address it finds its records where it left them."""

    def __init__(self, home: Path):
        self.home, self.port, self.proc = home, free_port(), None

    def env(self) -> dict[str, str]:
        return {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": f"http://127.0.0.1:{self.port}/api",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": "INFO"}

    def start(self) -> PrefectServer:
        import urllib.request

        prefect = str(Path(sys.executable).parent / "prefect")
        log_file = (self.home / "server.log").open("a")
        self.proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=log_file, stderr=subprocess.STDOUT, env=self.env())
        wait_until(lambda: urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2).status == 200,
                   180, "prefect server", 0.2)
        return self



def run_sync(prefect: PrefectServer, version: str, root: str, servers: list[str], source: str, log_path: Path,
             kill_after: float | None = None, down_s: float = 0.0, timeout: float = 240) -> tuple[str, float]:
    """Runs ``sync-weights`` in its own process. With ``kill_after``, SIGKILLs the Prefect server that long after
    the flow run began and starts it again ``down_s`` later. Returns (outcome, seconds from flow start to exit)."""
    began = time.perf_counter()
    with log_path.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _SYNC, version, root, json.dumps(servers), source], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, env=prefect.env())
    try:
        wait_until(lambda: "Beginning flow run" in log_path.read_text() or proc.poll() is not None, 120,
                   "flow run start", 0.02)
        began = time.perf_counter()
        late = False
        if kill_after is not None:
            time.sleep(kill_after)
            late = proc.poll() is not None
            prefect.kill()
            time.sleep(down_s)
            prefect.start()
        proc.wait(timeout)
        outcome = "completed" if proc.returncode == 0 and "SYNC-COMPLETED" in log_path.read_text() else \
            f"failed (exit {proc.returncode})"
        outcome += " (it had ended before the kill)" if late else ""
    except subprocess.TimeoutExpired:
        outcome = "hung"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return outcome, time.perf_counter() - began


def last_error(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text().splitlines() if "Error" in ln or "error" in ln]
    return (lines[-1] if lines else "no error line")[:200]


def prefect_restarts(tally: Tally, workdir: Path, trials: int, rng: random.Random, model: str = "small",
                     outage: float = 20.0) -> None:
    """Two ``baton serve`` processes, a real Prefect server; each trial syncs a new version from a checkpoint and
    kills Prefect at a random moment of the run, restarting it at once (even trials) or after ``outage`` seconds
    (odd ones). Whatever the run's outcome, each server must serve one complete version; the rerun of the same
    sync must complete with both servers on the new version."""
    import paddle

    from infer.config import get_config
    from harness.launch import baton_serve
    from infer.model import random_state_dict
    from infer.weights import state_digest

    config = get_config(model)
    root = str(workdir / "sync-snap")
    versions = {f"s{t}": 100 + t for t in range(trials + 2)}  # s0: what the servers start on; s1: calibration
    digests = {v: state_digest(random_state_dict(config, s)) for v, s in versions.items()}
    storage.publish(random_state_dict(config, versions["s0"]), root, "s0", part_bytes=16 << 20)
    sources = {}
    for v, seed in versions.items():
        (workdir / "ckpt" / v).mkdir(parents=True, exist_ok=True)
        sources[v] = str(workdir / "ckpt" / v / "model_state.pdparams")
        paddle.save({k: paddle.to_tensor(a) for k, a in random_state_dict(config, seed).items()}, sources[v])
    home = workdir / "prefect"
    home.mkdir()
    prefect = PrefectServer(home).start()
    try:
        args = ("--model", model, "--version", "s0")
        with baton_serve(root, *args, timeout=300) as a, baton_serve(root, *args, timeout=300) as b:
            servers = [a.url, b.url]
            outcome, window = run_sync(prefect, "s1", root, servers, sources["s1"], workdir / "sync-calibrate.log")
            if outcome != "completed":
                why = last_error(workdir / "sync-calibrate.log")
                raise RuntimeError(f"sync-weights without a fault: {outcome}: {why}")
            tally.note(f"sync-weights run {window:.1f}s (flow start to exit)")
            for t in range(2, trials + 2):
                version, log_path = f"s{t}", workdir / f"sync-{t}.log"
                down_s = 0.0 if t % 2 == 0 else outage  # odd trials: Prefect stays down a while
                kill_after = rng.uniform(0, 0.7 * window)  # the last 30% is the process shutting down
                outcome, _ = run_sync(prefect, version, root, servers, sources[version], log_path,
                                      kill_after=kill_after, down_s=down_s)
                tally.faults += 1
                tally.note(f"killed {kill_after:.1f}s into the run, down {down_s:.0f}s, restarted: the run {outcome}")
                completed = outcome.startswith("completed")
                if not completed:
                    tally.note(f"its error: {last_error(log_path)}")
                fleet = [_served_version(url, digests) for url in servers]
                if any(v is None for v in fleet):
                    tally.add("bad", f"after the restart a server serves no complete version: {fleet}")
                    continue
                rerun, _ = run_sync(prefect, version, root, servers, sources[version], workdir / f"sync-{t}-rerun.log")
                fleet = [_served_version(url, digests) for url in servers]
                if outcome == "hung" or rerun != "completed" or fleet != [version, version]:
                    tally.add("bad", f"first run {outcome}, rerun {rerun}, servers serve {fleet}")
                else:
                    tally.add("succeeded" if completed else "refused_clean", outcome)
    finally:
        prefect.stop()


def _served_version(url: str, digests: dict[str, str]) -> str | None:
    info = weights_of(url) or {}
    v = info.get("version")
    return v if v in digests and info.get("digest") == digests[v] else None
