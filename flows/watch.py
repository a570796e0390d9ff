"""``publish-new-checkpoints``: the scheduled flow. Finds the newest completed trainer checkpoint, publishes and
syncs it if that has not happened yet, and prunes old versions no server needs."""

from __future__ import annotations

from prefect import get_run_logger

import storage
from flows.checkpoint import DONE_MARKER, completed_steps
from flows.fleet import Server
from flows.inprocess import flow
from flows.publish import DEFAULT_PART_BYTES, Runner, publish_ranks
from flows.sync import read_server, sync_fleet


@flow(name="publish-new-checkpoints", log_prints=True)
def publish_new_checkpoints(trainer_dir: str, snapshot_root: str, servers: list[Server | str] | None = None,
                            keep_last: int = 3, marker: str = DONE_MARKER, part_bytes: int = DEFAULT_PART_BYTES,
                            tp_size: int = 1, runner: Runner = "threads", deltas: bool = False) -> dict:
    """Publish and sync the newest ``step_{N}/`` under ``trainer_dir`` that holds ``marker`` (the trainer writes
    it last, so a directory still being written is never taken). Running it again, or two runs overlapping, does
    no work twice: a committed version is not republished and servers already serving it are not reloaded.
    Versions beyond ``keep_last`` are pruned, except what any server serves, what a rollback would need and the
    bases of the deltas kept. ``deltas``: publish each checkpoint as a delta on the newest committed version."""
    log = get_run_logger()
    fleet_servers = [Server.parse(s) for s in servers or []]
    steps = completed_steps(trainer_dir, marker)
    if not steps:
        log.info("no completed checkpoint under %s yet (looking for step_N/%s)", trainer_dir, marker)
        return {"version": None, "published": False, "synced": False, "pruned": []}
    newest = steps[-1]
    held = {s.url: read_server(s) for s in fleet_servers}  # each server read once per run
    before = {url: (found or {}).get("version") for url, found in held.items()}
    versions = storage.list_versions(snapshot_root)
    committed = {v.version for v in versions}
    base = versions[-1].version if deltas and versions and versions[-1].version != newest.version else None
    already_live = bool(fleet_servers) and all(v == newest.version for v in before.values())
    published = synced = False
    if newest.version in committed and (already_live or not fleet_servers):
        log.info("%s is already published%s: nothing to do", newest.version, " and live" if fleet_servers else "")
    elif fleet_servers:
        sync_fleet(newest.version, snapshot_root, fleet_servers,
                   source=None if newest.version in committed else newest.url, part_bytes=part_bytes,
                   tp_size=tp_size, runner=runner, base=base, held=held)
        published, synced = newest.version not in committed, True
    else:
        publish_ranks(newest.url, snapshot_root, newest.version, part_bytes, tp_size, runner, base=base)
        published = True
    keep = {v for v in (*before.values(), newest.version) if v}  # a failed sync raised: they serve newest now
    pruned = storage.prune(snapshot_root, keep_last=keep_last, keep=sorted(keep))
    if pruned:
        log.info("pruned %s (kept the newest %d and %s)", pruned, keep_last, sorted(keep))
    return {"version": newest.version, "published": published, "synced": synced, "pruned": pruned}
