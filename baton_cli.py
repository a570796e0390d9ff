"""The ``baton`` command: each package adds its own subcommands."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from demo import main as demo_main
    from flows import serve as flows_serve
    from infer import cli as infer_cli
    from storage import cli as storage_cli

    parser = argparse.ArgumentParser(prog="baton",
                                     description="Weight handoff between an RL trainer and inference servers.")
    sub = parser.add_subparsers(dest="command", required=True)
    storage_cli.add_commands(sub)
    infer_cli.add_commands(sub)
    flows_serve.add_commands(sub)
    demo_main.add_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from storage.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
