"""The ``wove`` command line (also ``python -m wove``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from wove.demo import main

    return main()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per action."""
    parser = argparse.ArgumentParser(prog="wove", description="Inline task orchestration.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="run a weave whose heavy steps run in local worker processes")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wove`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    result: int = handler(args)
    return result
