"""Command-line backend worker: ``python -m wove.backend_worker [PAYLOAD | -]``.

Runs one wove backend payload (the text :func:`wove.backend.payload_to_b64` produces), taken from the argument, from
``WOVE_BACKEND_PAYLOAD`` when there is none, or from standard input when the argument is ``-``. Events go to the
payload's callback URL; this is what Slurm, Kubernetes or AWS Batch jobs run.

Exit status:
  0    the task succeeded (task_result delivered)
  1    the task raised (task_error delivered; its traceback is printed)
  2    usage or payload error: nothing ran
  3    the callback server refused the run or could not be reached before WOVE_POST_DEADLINE
  143  SIGTERM: task_cancelled delivered
  130  interrupted (Ctrl-C)

The module imports only what a run needs, so a cold worker starts fast; set WOVE_LOG_LEVEL (e.g. INFO) for logs.
"""

from __future__ import annotations

import gc
import os
import sys

__all__ = ["main"]

PAYLOAD_ENV = "WOVE_BACKEND_PAYLOAD"
EXIT_OK = 0
EXIT_TASK_FAILED = 1
EXIT_USAGE = 2
EXIT_CALLBACK = 3
EXIT_INTERRUPTED = 130
USAGE = f"usage: python -m wove.backend_worker [PAYLOAD | -]   (or set {PAYLOAD_ENV}; -h for help)"


def _fail(code: int, message: str) -> int:
    print(f"wove.backend_worker: {message}", file=sys.stderr)
    return code


def _freeze_startup() -> None:
    """Leave what start-up built out of garbage collection, and collect again from here on (``main`` paused it).

    Start-up (imports, mostly) makes next to no garbage, and its objects live until exit anyway: collecting while
    importing, and scanning them all again in the full collections of interpreter teardown, costs a cold worker
    several ms of CPU. What the run creates is collected as usual, finalizers included; atexit handlers, thread
    joins and the flushing of open files are untouched.
    """
    gc.freeze()
    gc.enable()


def main(argv: list[str] | None = None, *, one_shot: bool = False) -> int:
    """Run the payload named by ``argv`` (default ``sys.argv[1:]``) and return the exit status.

    ``one_shot`` says the process ends with this run (``python -m wove.backend_worker``): start-up then runs without
    garbage collection, and what it built stays out of it (see :func:`_freeze_startup`).
    """
    if one_shot:
        gc.disable()
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        return EXIT_OK
    if len(args) > 1:
        return _fail(EXIT_USAGE, f"expected at most one argument, got {len(args)}; {USAGE}")
    text = args[0] if args else os.environ.get(PAYLOAD_ENV, "")
    if text == "-":
        text = sys.stdin.read()
    if not text.strip():
        return _fail(EXIT_USAGE, f"no payload given; {USAGE}")
    level = os.environ.get("WOVE_LOG_LEVEL", "").upper()
    if level:
        import logging

        if not isinstance(logging.getLevelName(level), int):
            return _fail(EXIT_USAGE, f"WOVE_LOG_LEVEL must be a logging level name, not {level!r}")
        logging.basicConfig(level=level, format="%(name)s %(levelname)s %(message)s")

    from wove.backend.codec import payload_from_b64
    from wove.errors import BackendUnavailableError, CallbackError, ConfigError, PayloadError

    try:
        payload = payload_from_b64(text)
    except PayloadError as exc:
        return _fail(EXIT_USAGE, f"invalid payload: {exc}")

    from wove.backend.worker import RunTrace, run_payload

    if one_shot:
        _freeze_startup()
    trace = RunTrace()
    try:
        run_payload(payload, trace)
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted")
    except Exception as exc:
        if exc is trace.task_exception:
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
            return _fail(EXIT_TASK_FAILED, f"task {trace.task_name!r} failed: {type(exc).__name__}: {exc}")
        if isinstance(exc, CallbackError):
            return _fail(EXIT_CALLBACK, str(exc))
        if isinstance(exc, (PayloadError, BackendUnavailableError, ConfigError)):
            return _fail(EXIT_USAGE, f"cannot run payload: {exc}")
        raise
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(one_shot=True))
