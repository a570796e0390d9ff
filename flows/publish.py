"""``publish-checkpoint``: a trainer checkpoint becomes a Baton snapshot, one concurrent task per serving rank."""

from __future__ import annotations

import time
from typing import Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

import storage
from flows.checkpoint import serving_shard
from flows.inprocess import flow
from storage import DEFAULT_PART_BYTES, manifest_name, open_fs

Runner = Literal["threads", "dask", "ray"]


def transient(task, task_run, state) -> bool:
    """Retry storage hiccups (``OSError``: network, throttling, a full disk freed), never a bad checkpoint."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError)


def is_published(snapshot_root: str, version: str, rank: int) -> bool:
    fs, root = open_fs(snapshot_root)
    return fs.exists(f"{root}/{manifest_name(rank, version)}")


@task(name="publish-rank", retries=3, retry_delay_seconds=[1, 2, 4], retry_condition_fn=transient,
      cache_policy=NO_CACHE, task_run_name="publish {version} tp{rank}")
def publish_rank(source: str, snapshot_root: str, version: str, rank: int, tp_size: int,
                 part_bytes: int, base: str | None = None) -> dict:
    """Reads this rank's shard out of the checkpoint and publishes it. Each task reads for itself, so on Dask or
    Ray nothing model-sized travels between processes. A rank already committed under this id is left as is:
    a rerun or an overlapping run does not publish twice. With ``base``, only what changed since that version is
    written (its values read back from ``snapshot_root``), unless a delta would not pay."""
    if is_published(snapshot_root, version, rank):
        return {"rank": rank, "parts": None, "bytes": None, "seconds": 0.0, "GB/s": None, "note": "already published"}
    start = time.perf_counter()
    shard = serving_shard(source, rank, tp_size)
    report = storage.publish(shard, snapshot_root, version, rank, part_bytes=part_bytes,
                             metadata={"source": source, "tp_size": str(tp_size)}, base=base)
    seconds = time.perf_counter() - start
    return {"rank": rank, "parts": report.parts, "bytes": report.bytes, "seconds": round(seconds, 3),
            "GB/s": round(report.bytes / 1e9 / seconds, 3) if seconds else None,
            "note": report.note or report.manifest_url,
            "kind": report.kind, "base": report.base, "full_bytes": report.full_bytes}


def task_runner(runner: Runner):
    """The task runner for per-rank work: threads here, or a Dask/Ray cluster past one machine (optional extras
    ``baton[dask]`` / ``baton[ray]``; both start a local cluster unless configured otherwise)."""
    if runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=8)
    try:
        if runner == "dask":
            from prefect_dask import DaskTaskRunner

            return DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 1})
        from prefect_ray import RayTaskRunner

        return RayTaskRunner()
    except ImportError as exc:
        raise ValueError(f"runner={runner!r} needs the optional extra: pip install 'baton[{runner}]'") from exc


def publish_ranks(source: str, snapshot_root: str, version: str, part_bytes: int = DEFAULT_PART_BYTES,
                  tp_size: int = 1, runner: Runner = "threads", artifact: bool = True,
                  base: str | None = None) -> list[dict]:
    """The publishing itself, as tasks of whichever flow calls it (``publish-checkpoint``, or ``sync-weights``
    without a nested flow run, which would cost a flow run's bookkeeping). ``artifact``: leave the table of
    ranks (a caller that reports the publish in its own artifact saves an API call)."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be at least 1, got {tp_size}")
    storage.check_id(version)
    # a progress bar for several ranks; for one it would only jump from 0 to 100 (two API calls per sync)
    progress = create_progress_artifact(0.0, description=f"publishing {version}: ranks done out of {tp_size}") \
        if tp_size > 1 else None
    rows = []
    with task_runner(runner) as pool:
        futures = [pool.submit(publish_rank, parameters={
            "source": source, "snapshot_root": snapshot_root, "version": version, "rank": r,
            "tp_size": tp_size, "part_bytes": part_bytes, "base": base}) for r in range(tp_size)]
        for done, future in enumerate(as_completed(futures), start=1):
            rows.append(future.result())
            if progress is not None:
                update_progress_artifact(progress, 100.0 * done / tp_size)
    rows.sort(key=lambda row: row["rank"])
    if artifact:
        create_table_artifact(rows, key=f"publish-{version.lower().replace('_', '-')}",
                              description=f"{version} published under {snapshot_root}")
    total = sum(r["bytes"] or 0 for r in rows)
    get_run_logger().info("published %s: %d ranks, %.1f MiB", version, len(rows), total / (1 << 20))
    return rows


@flow(name="publish-checkpoint", log_prints=True)
def publish_checkpoint(source: str, snapshot_root: str, version: str, part_bytes: int = DEFAULT_PART_BYTES,
                       tp_size: int = 1, runner: Runner = "threads", base: str | None = None) -> list[dict]:
    """Shard the trainer checkpoint at ``source`` (a state dict file, a Paddle trainer's checkpoint directory at any
    tensor- and pipeline-parallel degree, or a Hugging Face directory: ``storage.checkpoint_tensors``) into
    ``tp_size`` ranks and publish each as version ``version`` under ``snapshot_root``; with ``base``, as a delta
    on that version where it pays. Returns one row per rank."""
    return publish_ranks(source, snapshot_root, version, part_bytes, tp_size, runner, base=base)
