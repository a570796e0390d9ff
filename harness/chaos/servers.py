"""What a ``baton serve`` process serves after a fault, proven bit for bit (the digest of its live weights and a
seeded completion), and updates that a kill interrupts.

Paddle, ``infer`` and httpx are imported by the functions that use them: the programs of this package import
it without them (the zygote forks publishers and must stay small and without threads).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import storage
from harness.launch import wait_until

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


def served_version(url: str, digests: dict[str, str]) -> str | None:
    """The version a server serves if its digest is that version's, else None."""
    info = weights_of(url) or {}
    v = info.get("version")
    return v if v in digests and info.get("digest") == digests[v] else None
