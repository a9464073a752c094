"""The ``wove`` command line (also ``python -m wove``): ``demo``, ``worker`` and ``doctor``.

Each command lives in a module of its own (``wove.cli_worker``, ``wove.doctor.command``) that adds its parser and
handler here. Exit statuses: 0 success, 1 failure (a failed check, a missing package), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

#: Exit status of a usage error, as argparse uses it.
EXIT_USAGE = 2


def _demo(args: argparse.Namespace, rest: list[str]) -> int:
    from wove.demo import main

    return main()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, one subcommand per action."""
    from wove.cli_worker import add_parser as add_worker
    from wove.doctor.command import add_parser as add_doctor

    parser = argparse.ArgumentParser(
        prog="wove",
        description="Inline task orchestration. Exit status: 0 success, 1 failure, 2 usage error.",
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="run a weave whose heavy steps run in local worker processes")
    demo.set_defaults(handler=_demo)
    add_worker(commands)
    add_doctor(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``wove`` script; returns the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    # Everything after the first "--" belongs to a backend's worker; argparse would treat it as positionals.
    rest: list[str] = []
    if "--" in arguments:
        cut = arguments.index("--")
        arguments, rest = arguments[:cut], arguments[cut + 1 :]
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(arguments)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if (unknown or rest) and not getattr(args, "accepts_rest", False):
        parser.print_usage(sys.stderr)
        print(f"wove: error: unrecognized arguments: {' '.join([*unknown, *rest])}", file=sys.stderr)
        return EXIT_USAGE
    result: int = handler(args, [*unknown, *rest])
    return result
