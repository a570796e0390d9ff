"""``sync-weights``: (optionally publish, then) make every inference server serve one version, or say exactly
which did not."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from flows.adapter import Adapter
from flows.fleet import Outcome, Refused, Server, Unreachable, Untouched
from flows.inprocess import flow
from flows.kinds import adapter_for
from flows.publish import DEFAULT_PART_BYTES, Runner, publish_ranks

RETRY_DELAYS = (1, 2, 4)  # seconds before each new try of a server that gave no usable answer


class FleetSyncError(RuntimeError):
    """Some servers did not take the version; the message has one line per server with its outcome."""


def _retry_unreachable(task, task_run, state) -> bool:
    """Connection errors, timeouts, 409 and 5xx get another try; a 400 (bad snapshot) never does."""
    return isinstance(state.result(raise_on_failure=False), Unreachable)


def read_server(server: Server) -> dict | None:
    """What a server serves now (None when it is empty, cannot say, or does not answer)."""
    return adapter_for(server).read()


@task(name="prepare-server", retries=len(RETRY_DELAYS), retry_delay_seconds=list(RETRY_DELAYS),
      retry_condition_fn=_retry_unreachable, cache_policy=NO_CACHE,
      task_run_name="prepare {version} on {adapter.server.url}")
def prepare_server(adapter: Adapter, version: str, snapshot_root: str, verify: str,
                   admin_token_env: str | None) -> dict:
    """Makes ``version`` ready on one server without serving it (``Adapter.prepare``)."""
    return adapter.prepare(version, snapshot_root, verify, admin_token_env)


@task(name="update-server", retries=len(RETRY_DELAYS), retry_delay_seconds=list(RETRY_DELAYS),
      retry_condition_fn=_retry_unreachable, cache_policy=NO_CACHE, task_run_name="update {server.url} to {version}")
def update_server(server: Server, version: str, snapshot_root: str, verify: str, admin_token_env: str | None) -> dict:
    """Stages, loads and confirms ``version`` on one server in one step, outside a fleet's two phases."""
    return adapter_for(server).take(version, snapshot_root, verify, admin_token_env)


@task(name="commit-fleet", cache_policy=NO_CACHE, task_run_name="commit {version} on {adapters_count} servers")
def commit_fleet(adapters: list[Adapter], adapters_count: int, version: str, snapshot_root: str, verify: str,
                 admin_token_env: str | None) -> list[tuple[dict | Exception, float]]:
    """Every server's commit at once: one thread per server, all released together, so the first and the last
    to serve the version are apart by one commit call, not by Prefect's bookkeeping of a task run each. A
    server's failure is returned in its place, not raised: the caller rolls the others back. Each with its
    seconds."""
    gate = threading.Barrier(len(adapters))

    def commit(adapter: Adapter) -> tuple[dict | Exception, float]:
        gate.wait()
        start = time.perf_counter()
        for delay in (*RETRY_DELAYS, None):
            try:
                return adapter.commit(version, snapshot_root, verify, admin_token_env), time.perf_counter() - start
            except Unreachable as exc:  # the same rule as the tasks' retries
                reply = exc
            except Exception as exc:  # noqa: BLE001 - reported per server
                return exc, time.perf_counter() - start
            if delay is not None:
                time.sleep(delay)
        return reply, time.perf_counter() - start

    with ThreadPoolExecutor(len(adapters)) as pool:
        return list(pool.map(commit, adapters))


def _failure(url: str, exc: BaseException) -> Outcome:
    if isinstance(exc, Untouched):
        return Outcome(url, False, "refused", None, str(exc), touched=False)
    if isinstance(exc, Refused):
        return Outcome(url, False, "refused", None, str(exc))
    return Outcome(url, False, "unreachable", None, str(exc))


def _result(future) -> dict | Exception:
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - unreachable after retries, or anything else: reported per server
        return exc


def _commit_failed(adapter: Adapter, exc: Exception, version: str, admin_token_env: str | None) -> Outcome:
    """A commit that failed: the prepared version is dropped (no request may name it there), and a server that
    took it anyway (its reply lost) is reported as having taken it, so the rollback returns it with the others."""
    outcome = _failure(adapter.server.url, exc)
    outcome.message = f"commit failed: {outcome.message}"
    try:
        adapter.abort(version, admin_token_env)
        serving = (adapter.held() or {}).get("version")
    except Exception:  # noqa: BLE001 - unreachable: its prepared state expires by itself
        return outcome
    if serving == version:
        outcome.ok, outcome.status, outcome.version = True, "live", version
        outcome.message += f"; yet it serves {version}"
    return outcome


def _abort(adapters: list[Adapter], outcomes: list[Outcome], version: str, admin_token_env: str | None) -> None:
    """A prepare failed: every server that prepared drops it, and none served it."""
    def drop(pair: tuple[Adapter, Outcome]) -> None:
        adapter, outcome = pair
        if not outcome.ok:
            return
        outcome.ok, outcome.status, outcome.version = False, "aborted", (adapter.before or {}).get("version")
        try:
            adapter.abort(version, admin_token_env)
            outcome.message += f"; aborted: {version} was never served"
        except Exception as exc:  # noqa: BLE001 - it still never served it; a spare expires by itself
            outcome.message += f"; abort failed ({exc}): {version} was never served, its prepared state expires"

    with ThreadPoolExecutor(len(adapters)) as pool:
        list(pool.map(drop, zip(adapters, outcomes)))


def _roll_back(adapters: list[Adapter], outcomes: list[Outcome], verify: str, admin_token_env: str | None,
               took_it_too: bool) -> None:
    """Servers that failed half-way and do not restore themselves (FastDeploy and SGLang, which may hold a partial
    model) go back to what they served before, unless the failure came before anything reached them; with
    ``took_it_too``, so do the servers that took the new version, so the fleet agrees again (a ``double_buffer``
    Baton server flips back, an ``in_place`` one that took a delta applies it again)."""
    def back(pair: tuple[Adapter, Outcome]) -> None:
        adapter, outcome = pair
        if (outcome.ok and not took_it_too) or (not outcome.ok and (adapter.restores_itself or not outcome.touched)):
            return
        previous = adapter.before
        if not previous:
            if outcome.ok:
                outcome.status = "kept"
            outcome.message += "; nothing to roll back to (it was empty, or held weights Baton did not load)"
            return
        target = previous.get("version") or previous.get("model_path")
        try:
            adapter.roll_back(previous, verify, admin_token_env)
            if outcome.ok:
                outcome.status, outcome.version = "rolled back", previous.get("version")
            outcome.message += f"; rolled back to {target}"
        except (Refused, Unreachable) as exc:
            outcome.status, outcome.ok = "rollback failed", False
            outcome.message += f"; rollback to {target} failed: {exc}"

    with ThreadPoolExecutor(len(adapters)) as pool:
        list(pool.map(back, zip(adapters, outcomes)))


def guarantee(outcomes: list[Outcome]) -> str:
    """What the fleet was promised, from how each server held the version before the commit."""
    serving_early = [o.url for o in outcomes if o.prepared == "checked"]
    if not serving_early:
        return "atomic: every server held the version ready before any served it"
    return (f"per server: {', '.join(serving_early)} (in_place) cannot hold a version without serving it, so it "
            "loads at the commit; run --swap double_buffer for the atomic flip")


@flow(name="sync-weights", log_prints=True)
def sync_weights(version: str, snapshot_root: str, servers: list[Server | str], source: str | None = None,
                 part_bytes: int = DEFAULT_PART_BYTES, tp_size: int = 1, on_failure: Literal["rollback", "keep"] =
                 "rollback", verify: Literal["full", "stream", "none"] = "stream", admin_token_env: str | None = None,
                 runner: Runner = "threads", base: str | None = None) -> list[dict]:
    """Publish ``source`` as ``version`` (when given), then flip every server to it in two phases: each prepares
    it (ready, not served) concurrently, and only when all have does each commit it, all at once. A prepare that
    fails aborts the others: no server ever served the version. A server is a URL (Baton's own) or ``{"url": ...,
    "kind": "baton" | "fastdeploy" | "sglang", ...}`` (``flows.fleet.Server`` lists each kind's fields). When a
    commit fails, ``on_failure="rollback"`` returns the servers that took it to their previous version; ``"keep"``
    leaves them; a FastDeploy or SGLang server that failed half-way is returned either way. The run then fails
    with a line per server. Each row says the fleet's ``guarantee`` (atomic unless an ``in_place`` server, which
    can only check at the prepare, was in it). Emits the event
    ``baton.weights.live`` when the version is live everywhere. ``base``: publish ``source`` as a delta on that
    version (Baton servers holding it read only the delta; FastDeploy and SGLang are staged full files)."""
    return sync_fleet(version, snapshot_root, servers, source, part_bytes, tp_size,
                      on_failure, verify, admin_token_env, runner, base)


def sync_fleet(version: str, snapshot_root: str, servers: list[Server | str], source: str | None = None,
               part_bytes: int = DEFAULT_PART_BYTES, tp_size: int = 1, on_failure: str = "rollback",
               verify: str = "stream", admin_token_env: str | None = None, runner: Runner = "threads",
               base: str | None = None, held: dict[str, dict | None] | None = None) -> list[dict]:
    """The body of ``sync-weights``, as tasks of the calling flow (the scheduled flow calls it too). ``held``: what
    each server (by URL) serves, when the caller has read it already; else each is read here, once."""
    log = get_run_logger()
    fleet_servers = [Server.parse(s) for s in servers]
    if not fleet_servers:
        raise ValueError("servers is empty: give at least one inference server URL")
    start = time.perf_counter()
    adapters = [adapter_for(s) for s in fleet_servers]
    if held is None:
        with ThreadPoolExecutor(len(adapters)) as pool:
            list(pool.map(Adapter.read, adapters))
    else:
        for adapter in adapters:
            adapter.before = held.get(adapter.server.url)
    published = None
    if source is not None:
        published = publish_ranks(source, snapshot_root, version, part_bytes, tp_size, runner, artifact=False,
                                  base=base)
    publish_s = time.perf_counter() - start
    futures = [prepare_server.submit(a, version, snapshot_root, verify, admin_token_env) for a in adapters]
    outcomes = []
    for adapter, reply in zip(adapters, [_result(f) for f in futures]):
        if isinstance(reply, Exception):
            outcomes.append(_failure(adapter.server.url, reply))
        else:
            outcomes.append(Outcome(adapter.server.url, True, "prepared", None, reply.get("message", ""),
                                    reply.get("seconds"), reply.get("bytes"), prepared=reply.get("held")))
    if any(not o.ok for o in outcomes):
        _abort(adapters, outcomes, version, admin_token_env)
    else:
        commits = commit_fleet(adapters, len(adapters), version, snapshot_root, verify, admin_token_env)
        for i, (adapter, (reply, seconds)) in enumerate(zip(adapters, commits)):
            o = outcomes[i]
            if isinstance(reply, Exception):
                outcomes[i] = _commit_failed(adapter, reply, version, admin_token_env)
                outcomes[i].prepared = o.prepared
                continue
            o.status, o.version, o.seconds = "live", version, round((o.seconds or 0) + seconds, 3)
            o.bytes = reply.get("bytes", o.bytes)
            o.message += f"; committed in {seconds * 1000:.1f} ms"
        if any(not o.ok for o in outcomes):
            _roll_back(adapters, outcomes, verify, admin_token_env, took_it_too=on_failure == "rollback")
    failed = [o for o in outcomes if not o.ok]
    promise = guarantee(outcomes)
    rows = [asdict(o) | {"guarantee": promise} for o in outcomes]
    what = f"sync of {version} to {len(fleet_servers)} servers ({promise})"
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
    log.info("%s live on %d servers in %.2fs (publish %.2fs); %s", version, len(outcomes), seconds, publish_s, promise)
    publish_work_s = max((r["seconds"] for r in published), default=0.0) if published else 0.0
    return [r | {"publish_s": publish_s, "publish_work_s": publish_work_s, "published": published is not None}
            for r in rows]
