"""``sync-weights``: (optionally publish, then) make every inference server serve one version, or say exactly
which did not."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from flows.kinds import adapter_for
from flows.fleet import Outcome, Refused, Server, Unreachable, Untouched
from flows.inprocess import flow
from flows.publish import DEFAULT_PART_BYTES, Runner, publish_ranks, renamed_tp


class FleetSyncError(RuntimeError):
    """Some servers did not take the version; the message has one line per server with its outcome."""


def _retry_unreachable(task, task_run, state) -> bool:
    """Connection errors, timeouts, 409 and 5xx get another try; a 400 (bad snapshot) never does."""
    return isinstance(state.result(raise_on_failure=False), Unreachable)


def read_server(server: Server) -> dict | None:
    """What a server serves before the sync (the rollback target); None when it is empty, cannot say, or does
    not answer, which the update that follows retries and reports. A plain call, not a task: a task run per read
    costs more in Prefect's bookkeeping than the read itself."""
    try:
        return adapter_for(server).held()
    except Unreachable:
        return None


@task(name="update-server", retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=_retry_unreachable,
      cache_policy=NO_CACHE, task_run_name="update {server.url} to {version}")
def update_server(server: Server, version: str, snapshot_root: str, verify: str, admin_token_env: str | None) -> dict:
    """Stages ``version`` for one server (for kinds that need it), loads it and confirms it is what it serves."""
    return adapter_for(server).take(version, snapshot_root, verify, admin_token_env)


def _outcomes(servers: list[Server], futures, version: str) -> list[Outcome]:
    outcomes = []
    for server, future in zip(servers, futures):
        try:
            reply = future.result()
            outcomes.append(Outcome(server.url, True, "live", version, reply["message"], reply.get("seconds"),
                                    reply.get("bytes")))
        except Untouched as exc:
            outcomes.append(Outcome(server.url, False, "refused", None, str(exc), touched=False))
        except Refused as exc:
            outcomes.append(Outcome(server.url, False, "refused", None, str(exc)))
        except Exception as exc:  # noqa: BLE001 - unreachable after retries, or anything else: reported per server
            outcomes.append(Outcome(server.url, False, "unreachable", None, str(exc)))
    return outcomes


def _roll_back(servers: list[Server], outcomes: list[Outcome], before: dict[str, dict], verify: str,
               admin_token_env: str | None, took_it_too: bool) -> None:
    """Servers that failed half-way and do not restore themselves (FastDeploy and SGLang, which may hold a partial
    model) go back to what they served before, unless the failure came before anything reached them; with
    ``took_it_too``, so do the servers that took the new version, so the fleet agrees again."""
    for server, outcome in zip(servers, outcomes):
        adapter = adapter_for(server)
        if (outcome.ok and not took_it_too) or (not outcome.ok and (adapter.restores_itself or not outcome.touched)):
            continue
        previous = before.get(server.url)
        if not previous:
            if outcome.ok:
                outcome.status = "kept"
            outcome.message += "; nothing to roll back to (it was empty, or held weights Baton did not load)"
            continue
        target = previous.get("version") or previous.get("model_path")
        try:
            adapter.roll_back(previous, verify, admin_token_env)
            if outcome.ok:
                outcome.status, outcome.version = "rolled back", previous.get("version")
            outcome.message += f"; rolled back to {target}"
        except (Refused, Unreachable) as exc:
            outcome.status, outcome.ok = "rollback failed", False
            outcome.message += f"; rollback to {target} failed: {exc}"


@flow(name="sync-weights", log_prints=True)
def sync_weights(version: str, snapshot_root: str, servers: list[Server | str], source: str | None = None,
                 part_bytes: int = DEFAULT_PART_BYTES, tp_size: int = 1, on_failure: Literal["rollback", "keep"] =
                 "rollback", verify: Literal["full", "stream", "none"] = "stream", admin_token_env: str | None = None,
                 runner: Runner = "threads", serving_tp: int | None = None, base: str | None = None) -> list[dict]:
    """Publish ``source`` as ``version`` (when given), load it on every server concurrently and confirm each
    serves it. A server is a URL (Baton's own) or ``{"url": ..., "kind": "baton" | "fastdeploy" | "sglang",
    ...}`` (``flows.fleet.Server`` lists each kind's fields). On partial failure ``on_failure="rollback"``
    returns the servers that took it to their previous version; ``"keep"`` leaves them; a FastDeploy server
    that failed half-way is returned either way. The run then fails with a line per server. Emits the event
    ``baton.weights.live`` when the version is live everywhere. ``base``: publish ``source`` as a delta on that
    version (Baton servers holding it read only the delta; FastDeploy and SGLang are staged full files)."""
    return sync_fleet(version, snapshot_root, servers, source, part_bytes, renamed_tp(tp_size, serving_tp),
                      on_failure, verify, admin_token_env, runner, base)


def sync_fleet(version: str, snapshot_root: str, servers: list[Server | str], source: str | None = None,
               part_bytes: int = DEFAULT_PART_BYTES, tp_size: int = 1, on_failure: str = "rollback",
               verify: str = "stream", admin_token_env: str | None = None, runner: Runner = "threads",
               base: str | None = None) -> list[dict]:
    """The body of ``sync-weights``, as tasks of the calling flow (the scheduled flow calls it too)."""
    log = get_run_logger()
    fleet_servers = [Server.parse(s) for s in servers]
    if not fleet_servers:
        raise ValueError("servers is empty: give at least one inference server URL")
    start = time.perf_counter()
    with ThreadPoolExecutor(len(fleet_servers)) as pool:
        before = {s.url: found for s, found in zip(fleet_servers, pool.map(read_server, fleet_servers))}
    published = None
    if source is not None:
        published = publish_ranks(source, snapshot_root, version, part_bytes, tp_size, runner, artifact=False,
                                  base=base)
    publish_s = time.perf_counter() - start
    futures = [update_server.submit(s, version, snapshot_root, verify, admin_token_env) for s in fleet_servers]
    outcomes = _outcomes(fleet_servers, futures, version)
    failed = [o for o in outcomes if not o.ok]
    if failed:
        _roll_back(fleet_servers, outcomes, before, verify, admin_token_env, took_it_too=on_failure == "rollback")
    rows = [asdict(o) for o in outcomes]
    what = f"sync of {version} to {len(fleet_servers)} servers"
    if published:
        what += (f"; published from {source} first: {len(published)} ranks, "
                 f"{sum(r['bytes'] or 0 for r in published) / (1 << 20):.1f} MiB in {publish_s:.2f} s")
    create_table_artifact(rows, key=f"sync-{version.lower().replace('_', '-')}", description=what)
    if failed:
        report = "\n".join(f"  {o.url}: {o.status}: {o.message}" for o in outcomes)
        raise FleetSyncError(f"{version} is not live on {len(failed)} of {len(outcomes)} servers "
                             f"(on_failure={on_failure}):\n{report}")
    seconds = time.perf_counter() - start
    emit_event(event="baton.weights.live", resource={"prefect.resource.id": f"baton.weights.{version}"},
               payload={"version": version, "snapshot_root": snapshot_root, "servers": [o.url for o in outcomes],
                        "seconds": seconds})
    log.info("%s live on %d servers in %.2fs (publish %.2fs)", version, len(outcomes), seconds, publish_s)
    publish_work_s = max((r["seconds"] for r in published), default=0.0) if published else 0.0
    return [r | {"publish_s": publish_s, "publish_work_s": publish_work_s, "published": published is not None}
            for r in rows]
