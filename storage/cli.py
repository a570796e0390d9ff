"""``baton publish | inspect | verify | versions | prune``: the storage commands."""

from __future__ import annotations

import argparse
import re
import sys

from . import catalog, hfdir, layout, trainer, writer
from .errors import SnapshotError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use e.g. 512MiB, 1GiB, 64MB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_rank_argument(text: str) -> int:
    """``--rank``: ``layout.parse_rank``, its refusal as argparse's usage error."""
    try:
        return layout.parse_rank(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _states(src: str, rank: int, tp_size: int | None):
    """(rank, state dict) to publish, one rank at a time, as lazy tensors: a checkpoint at ``tp_size`` serving
    ranks (by default the tensor-parallel degree it was saved with; a single file as ``rank``)."""
    if tp_size is None:
        if hfdir.is_hf_checkpoint(src):
            tp_size = 1
        else:
            degrees = trainer.Checkpoint(src).degrees
            if degrees == (1, 1):
                yield rank, trainer.checkpoint_tensors(src)
                return
            tp_size = degrees[0]
    for r in range(tp_size):
        yield r, trainer.checkpoint_tensors(src, rank=r, tp_size=tp_size)


def version_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", required=True, help="the version ([A-Za-z0-9_-], e.g. step-120)")


def cmd_publish(args: argparse.Namespace) -> int:
    layout.check_id(args.version)  # before reading a possibly huge source
    for rank, state in _states(args.src, args.rank, args.tp_size):
        r = writer.publish(state, args.to, args.version, rank, part_bytes=args.part_size, overwrite=args.overwrite,
                           sha256=args.sha256, progress=True, base=args.base, max_chain=args.max_chain)
        what = f"a delta on {r.base} ({r.bytes / max(r.full_bytes, 1):.1%} of the full bytes)" if r.kind == "delta" \
            else f"{r.parts} parts"
        print(f"published {r.version} rank {r.rank}: {what}, {human(r.bytes)} in {r.seconds:.2f} s "
              f"({r.gbps:.2f} GB/s) -> {r.manifest_url}")
        if r.note:
            print(f"  {r.note}")
        del state
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    states = catalog.inspect_snapshot(args.url, args.version, args.rank, fallback_dir=args.fallback_dir,
                                      strict=args.strict)
    print(f"{'level':<6}{'source':<21}{'state':<10}{'files':>6}{'bytes':>12}  where / detail")
    for s in states:
        print(f"{int(s.level):<6}{s.level.label:<21}{s.state:<10}{s.files:>6}{human(s.bytes):>12}  {s.where}")
        if s.detail:
            print(f"{'':<55}{s.detail}")
    chosen = next((s for s in states if s.state == "complete"), None)
    print(f"would load: level {int(chosen.level)} ({chosen.level.label})" if chosen
          else "would load: nothing (no complete level)")
    return 0 if chosen else 1


def cmd_verify(args: argparse.Namespace) -> int:
    level, checks = catalog.verify_snapshot(args.url, args.version, args.rank, fallback_dir=args.fallback_dir,
                                          strict=args.strict, sha256=args.sha256)
    for c in checks:
        print(f"{'ok ' if c.ok else 'BAD'} {c.url}: {c.detail}")
    bad = sum(not c.ok for c in checks)
    print(f"level {int(level)} ({level.label}): {len(checks) - bad}/{len(checks)} files verified")
    return 1 if bad else 0


def cmd_versions(args: argparse.Namespace) -> int:
    import datetime

    for v in catalog.list_versions(args.url):
        when = datetime.datetime.fromtimestamp(v.published_at).isoformat(timespec="seconds")
        kind = f"delta on {v.base}" if v.base else "full"
        print(f"{v.version:<24} ranks {','.join(map(str, v.ranks)):<10} {human(v.bytes):>12}  {when}  {kind}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    removed = catalog.prune(args.url, args.keep_last, keep=args.keep)
    print(f"removed {len(removed)} version(s): {', '.join(removed) or '-'}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("url", help="snapshot root: a directory or fsspec URL (file://, s3://bucket/prefix, memory://)")
        version_flag(p)
        p.add_argument("--rank", type=parse_rank_argument, default=0, help="tensor-parallel rank (default 0)")
        p.add_argument("--fallback-dir",
                       help="shared fallback directory (level 4) holding model_state.tp{r}.{id}.pdparams")
        p.add_argument("--strict", action="store_true", help="refuse parts that have no manifest")

    p = sub.add_parser("publish", help="shard a checkpoint into part files + manifest",
                       description="Shard a trainer checkpoint into model_state.tp{r}.{id}.part{N}.pdparams files and "
                       "commit it by writing the manifest last.")
    p.add_argument("src", help="a .pdparams (paddle.save pickle, read without running code) or safetensors file, a "
                   "Paddle trainer's checkpoint directory (model_state[.tpNN][_ppNN].pdparams files, fused "
                   "projections too, or a unified checkpoint), or a Hugging Face model directory (any fsspec URL)")
    p.add_argument("--to", required=True, help="snapshot root URL to publish into")
    version_flag(p)
    p.add_argument("--rank", type=parse_rank_argument, default=0, help="rank to publish a single file as (default 0)")
    p.add_argument("--tp-size", type=int, default=None,
                   help="serving tensor-parallel degree to merge or split the checkpoint into (default: the degree "
                   "it was saved with; 1 for a Hugging Face directory)")
    p.add_argument("--part-size", type=parse_size, default=writer.DEFAULT_PART_BYTES,
                   help="largest part; a bigger tensor gets a part of its own (default 512MiB)")
    p.add_argument("--overwrite", action="store_true", help="replace a version that already exists")
    p.add_argument("--sha256", action="store_true",
                   help="also record each part's SHA-256 for audits (costs about as much as the write)")
    p.add_argument("--base", help="publish only what changed since this committed version (a delta); written in full "
                   "when that would not pay")
    p.add_argument("--max-chain", type=int, default=writer.MAX_DELTA_DEPTH,
                   help=f"a full version at least every this many versions (default {writer.MAX_DELTA_DEPTH})")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("inspect", help="show what exists at each loading level and which would load")
    where(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="re-hash the parts (xxh3_128, and SHA-256 with --sha256) against the manifest")
    where(p)
    p.add_argument("--sha256", action="store_true", help="also check the SHA-256 recorded by publish --sha256")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("versions", help="list committed versions, oldest first")
    p.add_argument("url", help="snapshot root URL")
    p.set_defaults(func=cmd_versions)

    p = sub.add_parser("prune", help="delete old versions (manifest first)")
    p.add_argument("url", help="snapshot root URL")
    p.add_argument("--keep-last", type=int, required=True, help="how many of the newest versions to keep (>= 1)")
    p.add_argument("--keep", nargs="*", default=[], help="ids never to delete (e.g. the one a server serves now)")
    p.set_defaults(func=cmd_prune)


def run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (SnapshotError, ValueError, FileNotFoundError) as exc:
        print(f"baton {args.command}: {exc}", file=sys.stderr)
        return 2
