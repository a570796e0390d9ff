"""Scenario 4: the S3 server SIGKILLed in the middle of an update. The update answers a clear non-2xx and the old
version still serves (or, once the write had begun, nothing is served rather than a torn model); while S3 is
down another update is refused without changing what is served; once S3 is back an update succeeds."""

from __future__ import annotations

import random

from harness.chaos.processes import BUCKET, moto_s3
from harness.chaos.servers import calibrate_update, judge_server, kill_during_update, publish_pair
from harness.chaos.tally import Tally


def s3_kills(tally: Tally, trials: int, model: str, rng: random.Random, down_checks: bool = True) -> dict:
    """Serves v1 from the loopback S3 server, SIGKILLs that server at a random moment of an update to v2 (even
    trials while it verifies checksums, odd ones while it writes the live weights), and checks the answer is a
    clear non-2xx with v1 still serving bit-exact (or nothing served, when the write had begun).
    With storage still down another update must be answered 503. Then S3 comes back (empty: v1 and v2 are
    published again) and an update to v2 must succeed. Returns the HTTP statuses seen."""
    import httpx

    from harness.launch import baton_serve
    from infer.config import get_config

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
