"""``baton serve``: one inference server over a snapshot root, a Hugging Face model directory, or both."""

from __future__ import annotations

import argparse
import logging
import os
import socket

from infer.config import CONFIGS, DTYPES, get_config

log = logging.getLogger("baton.serve")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve completions and weight updates over HTTP",
                       description="Serve OpenAI-style completions from weights loaded out of a snapshot root or a "
                                   "Hugging Face model directory; POST /v1/update_weights swaps in a new version "
                                   "atomically.")
    p.add_argument("--snapshot-root", help="fsspec URL the versions are published under")
    p.add_argument("--model-dir", metavar="DIR",
                   help="Hugging Face model directory (any fsspec URL): architecture from config.json, tokenizer "
                        "from tokenizer.json; its weights are served unless a --snapshot-root version loads")
    p.add_argument("--rank", type=int, default=0, help="which rank's files to load (default 0)")
    p.add_argument("--tp-size", type=int, default=1,
                   help="tensor-parallel degree of the snapshot: the server loads every rank into one model")
    p.add_argument("--model", default="tiny", choices=sorted(CONFIGS),
                   help="built-in model size, without --model-dir (default tiny)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weight dtype (default: config.json's torch_dtype with --model-dir, else float32)")
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="context served, prompt + completion (default: max_position_embeddings with --model-dir)")
    p.add_argument("--version", help="version to load at start (default: the newest committed one, if any)")
    p.add_argument("--fallback-dir", help="shared fallback directory (loading level 4)")
    p.add_argument("--swap", default="in_place", choices=["in_place", "double_buffer"],
                   help="in_place: bounded memory, requests pause during an update; double_buffer: serving "
                        "continues while the spare copy loads, at one extra model of memory (default in_place)")
    p.add_argument("--verify", default="stream", choices=["full", "stream", "none"],
                   help="checksum policy for updates (default stream: every byte read once and hashed as it is "
                        "written; a bad part puts the previous version back. full: every part hashed before the "
                        "first write, reading twice)")
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
    if not args.snapshot_root and not args.model_dir:
        raise SystemExit("baton serve: give --snapshot-root (published versions), --model-dir (a Hugging Face "
                         "model directory) or both")
    try:
        config, tokenizer = _model(args)
        settings = EngineConfig(args.max_num_seqs, args.kv_cache_mb, args.max_num_batched_tokens)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"baton serve: {exc}") from None
    manager = WeightManager(config, args.snapshot_root, rank=args.rank, tp_size=args.tp_size,
                            fallback_dir=args.fallback_dir, mode=args.swap, verify=args.verify,
                            drain_timeout=args.drain_timeout)
    info = None
    if args.snapshot_root and args.version is not None:
        try:
            info = manager.update(args.version, startup=True)
        except UpdateError as exc:
            raise SystemExit(f"baton serve: could not load {args.version!r} at start: {exc}") from None
    elif args.snapshot_root:
        info = _load_newest(manager, storage.list_versions(args.snapshot_root))
    if info is None and args.model_dir:
        info = _adopt_model_dir(manager, args)
    if info is None:
        log.warning("no loadable version under %s yet: serving 503 until POST /v1/update_weights",
                    args.snapshot_root)
    else:
        log.info("serving %s (level %d, %d bytes, %.2fs)", info.version, info.level, info.bytes, info.seconds)
    name = config.name if args.model_dir else f"baton-{config.name}"
    engine = Engine(manager, config, settings, manager.metrics, tokenizer=tokenizer).start()
    manager.on_drain_timeout = engine.abort_slot
    app = create_app(manager, engine, name, token, tokenizer)
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


def _model(args: argparse.Namespace):
    """``(config, tokenizer)``: a model directory's (checked now, so a bad one fails within seconds), or a
    built-in size with the byte tokenizer."""
    from infer.tokenizer import BYTES, HFTokenizer

    if not args.model_dir:
        overrides = {"dtype": args.dtype} if args.dtype else {}
        if args.max_model_len:
            overrides["max_seq_len"] = args.max_model_len
        return get_config(args.model, **overrides), BYTES
    from infer.hf import read_config

    config = read_config(args.model_dir, dtype=args.dtype, max_seq_len=args.max_model_len)
    tokenizer = HFTokenizer.from_dir(args.model_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{args.model_dir}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
                         f"vocab_size is {config.vocab_size}")
    return config, tokenizer


def _adopt_model_dir(manager, args: argparse.Namespace):
    """The model directory's own weights, served as version ``--version`` (default: the directory's name)."""
    from infer.hf import read_model_dir
    from infer.weights import UpdateError

    def weights():
        return read_model_dir(args.model_dir, dtype=args.dtype, max_seq_len=args.max_model_len)[1]

    version = args.version or manager.config.name
    try:
        return manager.adopt(version, args.model_dir, weights)
    except UpdateError as exc:
        if args.snapshot_root:  # the snapshot may still bring weights: serve 503 until then
            log.warning("%s", exc)
            return None
        raise SystemExit(f"baton serve: {exc}") from None


def _load_newest(manager, versions: list):
    """The newest committed version that loads; a broken newest one is skipped with a warning, not fatal."""
    from infer.weights import UpdateError

    for v in reversed(versions):
        try:
            return manager.update(v.version, startup=True)
        except UpdateError as exc:
            log.warning("newest version %s does not load, trying an older one: %s", v.version, exc)
    return None
