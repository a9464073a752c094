"""``wove doctor [--environment NAME] [--config PATH] [--json] [--timeout S]``: exit 0 when every check passes, 1 when
one fails, 2 for a usage error (no configuration, an unknown environment)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "run"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


def add_parser(commands: Any) -> None:
    """Add ``wove doctor`` to the ``wove`` parser's subcommands."""
    from wove.doctor import DEFAULT_TIMEOUT

    doctor = commands.add_parser(
        "doctor",
        help="check that each environment's backend runs a task and its events come back",
        description="For each environment of wove_config.py: the packages it needs are installed, its backend "
        "answers, and a ping task submitted through the real backend is run by a worker whose events reach the "
        "callback URL. One line per check (ok, FAIL, skip) with a fix for each failure. Exit status: 0 all checks "
        "passed, 1 a check failed, 2 usage error.",
        allow_abbrev=False,
    )
    doctor.add_argument("--environment", metavar="NAME", action="append", help="check only NAME (repeatable)")
    doctor.add_argument(
        "--config", metavar="PATH", help="the wove_config.py to check (default: the nearest one, from here upwards)"
    )
    doctor.add_argument("--json", action="store_true", help="print a machine-readable report")
    doctor.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="S",
        help="seconds to wait for an environment to start, and for its ping's result (default %(default)g)",
    )
    doctor.set_defaults(handler=run)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """Load the configuration, check the environments, print the report; the exit status says whether all passed."""
    from wove.config_file import load_settings
    from wove.doctor import diagnose
    from wove.errors import ConfigError

    try:
        settings, path = load_settings(args.config)
        report = diagnose(settings, args.environment, timeout=args.timeout, config=str(path))
    except (ConfigError, NameError) as exc:  # NameError: UnknownEnvironmentError
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc)}))
        print(f"wove doctor: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return EXIT_OK if report.ok else EXIT_FAILED
