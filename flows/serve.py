"""``baton deploy`` (or ``python -m flows.serve``): the three flows as deployments in one process.

Runs of ``sync-weights/sync-weights`` and the others start from the UI, the API or
``prefect deployment run``; ``publish-new-checkpoints`` also runs on an interval when ``--watch`` is given.
Runs of ``sync-weights`` execute in this process (``flows.warm``), so they start within ``--poll`` seconds;
the other two run as Prefect runs served deployments, each in a fresh process.
It needs a Prefect server (``prefect server start``, then ``PREFECT_API_URL=http://127.0.0.1:4200/api``).
"""

from __future__ import annotations

import argparse
import sys

SERVER_HELP = ("an inference server: Baton's as URL[#rank=R], or any kind as JSON, e.g. '{\"url\": "
               "\"http://h:8188\", \"kind\": \"fastdeploy\", \"model_dir\": \"/models/m\", \"gpu_ids\": [0, 1]}' "
               "or '{\"url\": ..., \"kind\": \"sglang\", \"model_dir\": \"/exports\"}' (repeat for several)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sync", help="make every server serve one version now (the sync-weights flow, run here)",
                       description="Runs the sync-weights flow in this process: publishes --source as VERSION when "
                                   "given, loads VERSION on every --server, confirms each, and on a partial failure "
                                   "rolls the fleet back (--on-failure keep leaves it). Exit 1 when some server did "
                                   "not take it, with a line per server.")
    s.add_argument("version", help="the snapshot id to serve, e.g. step-120")
    s.add_argument("--snapshot-root", required=True, help="fsspec URL the versions are published under")
    s.add_argument("--server", action="append", required=True, metavar="SERVER", help=SERVER_HELP)
    s.add_argument("--source", help="a trainer checkpoint or Hugging Face directory to publish as VERSION first")
    s.add_argument("--tp-size", type=int, default=1, help="serving ranks to publish --source as (default 1)")
    s.add_argument("--base", help="publish --source as a delta on this committed version (Baton servers holding it "
                                  "read only what changed)")
    s.add_argument("--on-failure", choices=["rollback", "keep"], default="rollback")
    s.add_argument("--verify", choices=["stream", "full", "none"], default="stream",
                   help="how Baton servers check the parts (default stream)")
    s.add_argument("--admin-token-env", metavar="VAR", help="environment variable holding the servers' admin token")
    s.add_argument("--temporary-prefect", action="store_true",
                   help="record the run in a Prefect server started for this command only (seconds of start-up), "
                        "instead of PREFECT_API_URL or Baton's local server (see `baton prefect`)")
    s.set_defaults(func=sync)
    pf = sub.add_parser("prefect", help="Baton's local Prefect server, which `baton sync` starts once and reuses",
                        description=home_doc(), formatter_class=argparse.RawDescriptionHelpFormatter)
    pf.add_argument("action", choices=["status", "start", "stop"])
    pf.add_argument("--url", action="store_true", help="status and start: print only the API URL")
    pf.set_defaults(func=lambda a: prefect_server(a.action, a.url))
    p = sub.add_parser("deploy", help="serve the Prefect deployments (publish-checkpoint, sync-weights, "
                                      "publish-new-checkpoints)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=deploy)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--watch", metavar="URL", help="trainer output to watch for step_N/ checkpoints (enables the "
                                                  "schedule of publish-new-checkpoints)")
    p.add_argument("--snapshot-root", help="where the scheduled flow publishes (required with --watch)")
    p.add_argument("--server", action="append", default=[], metavar="SERVER",
                   help="for the scheduled flow to sync: " + SERVER_HELP)
    p.add_argument("--interval", type=float, default=60.0, help="seconds between scheduled runs (default 60)")
    p.add_argument("--keep-last", type=int, default=3, help="versions the scheduled flow keeps (default 3)")
    p.add_argument("--spawn-syncs", action="store_true",
                   help="run sync-weights like the other deployments, each run in a fresh process (by default "
                        "its runs execute in this warm process: they start in about --poll, not ~2 s later)")
    p.add_argument("--poll", type=float, default=0.5, metavar="S",
                   help="seconds between checks for new runs: a run created from the UI, the API or `prefect "
                        "deployment run` starts within about this plus a process start (default 0.5; Prefect's is 10)")


def home_doc() -> str:
    from flows import home

    return home.__doc__ or ""


def prefect_server(action: str, url_only: bool) -> int:
    from flows.home import main

    return main(action, url_only=url_only)


def sync(args: argparse.Namespace) -> int:
    if not args.temporary_prefect:
        from flows.home import describe, use_local_prefect

        _, server = use_local_prefect()
        if server is not None and server.started:
            print(f"baton sync: started {describe(server)}", file=sys.stderr)
    from flows.sync import FleetSyncError, sync_weights

    try:
        rows = sync_weights(args.version, args.snapshot_root, args.server, source=args.source,
                            tp_size=args.tp_size, on_failure=args.on_failure,
                            verify=args.verify, admin_token_env=args.admin_token_env, base=args.base)
    except FleetSyncError as exc:
        print(f"baton sync: {exc}", file=sys.stderr)
        return 1
    for row in rows:
        print(f"{row['url']}: {row['status']} {row['version']} in {row['seconds'] or 0:.2f} s")
    print(f"guarantee: {rows[0]['guarantee']}")
    return 0


def deploy(args: argparse.Namespace) -> int:
    from prefect import serve

    from flows.publish import publish_checkpoint
    from flows.sync import sync_weights
    from flows.warm import WarmRunner
    from flows.watch import publish_new_checkpoints

    if args.watch and not args.snapshot_root:
        raise SystemExit("baton deploy: --watch needs --snapshot-root (where to publish)")
    watch: dict = {"concurrency_limit": 1}  # overlapping scheduled runs queue instead of racing
    if args.watch:
        watch["interval"] = args.interval
        watch["parameters"] = {"trainer_dir": args.watch, "snapshot_root": args.snapshot_root,
                               "servers": args.server, "keep_last": args.keep_last}
    deployments = [publish_checkpoint.to_deployment("publish-checkpoint"),
                   publish_new_checkpoints.to_deployment("publish-new-checkpoints", **watch)]
    warm = None
    if args.spawn_syncs:
        deployments.append(sync_weights.to_deployment("sync-weights"))
    else:
        warm = WarmRunner(sync_weights, "sync-weights", args.poll)
        warm.start()
        print("sync-weights/sync-weights: runs execute in this process, checked every "
              f"{args.poll:g} s (--spawn-syncs for a process per run)", flush=True)
    try:
        serve(*deployments, query_seconds=args.poll)
    finally:
        if warm is not None:
            warm.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return deploy(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
