"""``baton serve``: one inference server over a snapshot root."""

from __future__ import annotations

import argparse
import logging
import os
import socket

from infer.config import CONFIGS, DTYPES, get_config

log = logging.getLogger("baton.serve")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve completions and weight updates over HTTP",
                       description="Serve OpenAI-style completions from weights loaded out of a snapshot root; "
                                   "POST /v1/update_weights swaps in a new version atomically.")
    p.add_argument("--snapshot-root", required=True, help="fsspec URL the versions are published under")
    p.add_argument("--rank", type=int, default=0, help="which rank's files to load (default 0)")
    p.add_argument("--tp-size", type=int, default=1,
                   help="tensor-parallel degree of the snapshot: the server loads every rank into one model")
    p.add_argument("--model", default="tiny", choices=sorted(CONFIGS), help="model size (default tiny)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weight dtype (default: the model's, float32)")
    p.add_argument("--version", help="version to load at start (default: the newest committed one, if any)")
    p.add_argument("--fallback-dir", help="shared fallback directory (loading level 4)")
    p.add_argument("--swap", default="in_place", choices=["in_place", "double_buffer"],
                   help="in_place: bounded memory, requests pause during an update; double_buffer: serving "
                        "continues while the spare copy loads, at one extra model of memory (default in_place)")
    p.add_argument("--verify", default="full", choices=["full", "stream", "none"],
                   help="checksum policy for updates (default full: every part before the first write)")
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="how long an update waits for running requests before ending them with finish_reason "
                        "'abort' (default 60)")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="sequences generated at once; a request with n samples counts n (default 64)")
    p.add_argument("--kv-cache-mb", type=int, default=512,
                   help="KV-cache budget in MiB; requests wait when it is full (default 512, never more than "
                        "--max-num-seqs full contexts)")
    p.add_argument("--max-num-batched-tokens", type=int, default=256,
                   help="token rows per engine step: every decoding sequence, then prefill chunks (default 256)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--admin-token-env", metavar="VAR",
                   help="require 'Authorization: Bearer $VAR' on /v1/update_weights")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    import storage
    from infer.engine import Engine, EngineConfig
    from infer.server import create_app
    from infer.weights import UpdateError, WeightManager

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = None
    if args.admin_token_env:
        token = os.environ.get(args.admin_token_env)
        if not token:
            raise SystemExit(f"baton serve: --admin-token-env {args.admin_token_env} is set but that variable is "
                             "empty or missing; export it or drop the flag")
    overrides = {"dtype": args.dtype} if args.dtype else {}
    config = get_config(args.model, **overrides)
    try:
        settings = EngineConfig(args.max_num_seqs, args.kv_cache_mb, args.max_num_batched_tokens)
    except ValueError as exc:
        raise SystemExit(f"baton serve: {exc}") from None
    manager = WeightManager(config, args.snapshot_root, rank=args.rank, tp_size=args.tp_size,
                            fallback_dir=args.fallback_dir, mode=args.swap, verify=args.verify,
                            drain_timeout=args.drain_timeout)
    if args.version is not None:
        try:
            info = manager.update(args.version, startup=True)
        except UpdateError as exc:
            raise SystemExit(f"baton serve: could not load {args.version!r} at start: {exc}") from None
    else:
        info = _load_newest(manager, storage.list_versions(args.snapshot_root))
    if info is None:
        log.warning("no loadable version under %s yet: serving 503 until POST /v1/update_weights",
                    args.snapshot_root)
    else:
        log.info("serving %s (level %d, %d bytes, %.2fs)", info.version, info.level, info.bytes, info.seconds)
    name = f"baton-{config.name}"
    engine = Engine(manager, config, settings, manager.metrics).start()
    manager.on_drain_timeout = engine.abort_slot
    app = create_app(manager, engine, name, token)
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it: no 40 ms Nagle waits
    sock.bind((args.host, args.port))
    sock.listen(2048)  # from here on connections queue up: the address printed below is usable at once
    host, port = sock.getsockname()[:2]
    print(f"baton serve: {name} listening on http://{host}:{port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
    return 0


def _load_newest(manager, versions: list):
    """The newest committed version that loads; a broken newest one is skipped with a warning, not fatal."""
    from infer.weights import UpdateError

    for v in reversed(versions):
        try:
            return manager.update(v.id, startup=True)
        except UpdateError as exc:
            log.warning("newest version %s does not load, trying an older one: %s", v.id, exc)
    return None
