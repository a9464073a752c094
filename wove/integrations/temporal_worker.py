"""The Temporal side of wove: the activity that runs a payload, and a worker that polls wove's task queue.

Start a worker where your tasks can run (wove and your code installed)::

    python -m wove.integrations.temporal_worker --target-host temporal.internal:7233 --namespace default \\
        --task-queue wove

To host wove's workflow and activity in a worker of your own (your data converter, interceptors, tuning)::

    from wove.integrations.temporal_worker import build_worker

    worker = build_worker(client, "wove", max_concurrent_activities=20)
    await worker.run()

The activity runs the payload through ``wove.integrations.worker.arun`` on the worker's event loop (a plain function
in a thread), posting wove's events to the weave while it sends Temporal heartbeats. Cancellation reaches it through
those heartbeats: the task is cancelled where it awaits and the weave is told. A task that raises fails the activity
(not retried: the weave already has the exception), so the workflow ends ``FAILED`` with the task's error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

from temporalio import activity
from temporalio.client import Client, TLSConfig
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from wove.errors import BackendUnavailableError, CallbackError, PayloadError
from wove.integrations._async_worker import close_connections
from wove.integrations._async_worker import run_payload as run_on_session
from wove.integrations.temporal_workflow import ACTIVITY_NAME, WoveRunWorkflow

__all__ = ["ACTIVITIES", "WORKFLOWS", "build_parser", "build_worker", "exit_process", "main", "run_payload"]

logger = logging.getLogger("wove.integrations.temporal_worker")

#: Seconds between ``activity.heartbeat()`` calls; Temporal sends them on at most every ``--heartbeat-throttle``.
HEARTBEAT_EVERY = 1.0
#: Defaults of the command's options.
DEFAULT_TARGET_HOST = "localhost:7233"
DEFAULT_NAMESPACE = "default"
DEFAULT_TASK_QUEUE = "wove"
DEFAULT_MAX_CONCURRENT_ACTIVITIES = 100
DEFAULT_HEARTBEAT_THROTTLE = 5.0
DEFAULT_GRACEFUL_SHUTDOWN = 10.0
DEFAULT_CONNECT_TIMEOUT = 15.0
#: Environment variable holding an API key (kept off the command line, where ``ps`` would show it).
API_KEY_ENV = "TEMPORAL_API_KEY"
#: Exit statuses of ``main``.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


@activity.defn(name=ACTIVITY_NAME)
async def run_payload(payload: dict[str, Any]) -> None:
    """Run one wove payload and report to the weave; Temporal heartbeats flow meanwhile, carrying cancellation.

    Returns ``None``: the value went to the weave. A copy of a run that is no longer pending returns without running.
    """
    beating = asyncio.ensure_future(_heartbeats())
    try:
        await run_on_session(payload)
    except (CallbackError, BackendUnavailableError) as exc:  # the weave could not be reached: a retry may pass
        raise ApplicationError(f"wove could not reach the weave: {exc}", type=type(exc).__name__) from None
    except PayloadError as exc:
        raise ApplicationError(f"invalid wove payload: {exc}", type="PayloadError", non_retryable=True) from None
    except Exception as exc:  # the task's own exception, already reported to the weave
        name = payload.get("task_name")
        message = f"task {name!r} raised: {exc}"
        raise ApplicationError(message, type=type(exc).__name__, non_retryable=True) from None
    finally:
        beating.cancel()


async def _heartbeats() -> None:
    """Record a heartbeat every ``HEARTBEAT_EVERY`` seconds; the SDK throttles what reaches the server."""
    while True:
        activity.heartbeat()
        await asyncio.sleep(HEARTBEAT_EVERY)


#: What a worker must register to run wove's runs.
WORKFLOWS = [WoveRunWorkflow]
ACTIVITIES = [run_payload]


def build_worker(client: Client, task_queue: str, **options: Any) -> Worker:
    """A ``temporalio.worker.Worker`` running wove's workflow and activity on ``task_queue``.

    ``options`` go to ``Worker`` (``max_concurrent_activities``, ``max_heartbeat_throttle_interval``, ...). wove's
    modules pass through the workflow sandbox: the workflow module has no side effects and needs no re-import.
    """
    options.setdefault(
        "workflow_runner",
        SandboxedWorkflowRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules("wove")),
    )
    return Worker(client, task_queue=task_queue, workflows=WORKFLOWS, activities=ACTIVITIES, **options)


# -- the command -------------------------------------------------------------------------------------------------


def build_parser(prog: str = "python -m wove.integrations.temporal_worker") -> argparse.ArgumentParser:
    """The command's arguments; ``TEMPORAL_ADDRESS``/``TEMPORAL_NAMESPACE`` set the defaults, as for Temporal's CLI."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run a Temporal worker for wove's task queue: the WoveRun workflow and the activity that runs "
        f"wove tasks. An API key is read from ${API_KEY_ENV}. Exit status: 0 stopped by SIGINT/SIGTERM, 1 the worker "
        "failed, 2 usage error, 3 Temporal unreachable or the namespace refused.",
    )
    parser.add_argument(
        "--target-host",
        default=os.environ.get("TEMPORAL_ADDRESS") or DEFAULT_TARGET_HOST,
        help="Temporal frontend HOST:PORT (default: $TEMPORAL_ADDRESS or %(default)s)",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("TEMPORAL_NAMESPACE") or DEFAULT_NAMESPACE,
        help="namespace (default: $TEMPORAL_NAMESPACE or %(default)s)",
    )
    parser.add_argument(
        "--task-queue",
        default=DEFAULT_TASK_QUEUE,
        help="task queue to poll; the environment's task_queue (%(default)s)",
    )
    parser.add_argument(
        "--max-concurrent-activities",
        type=_positive_int,
        default=DEFAULT_MAX_CONCURRENT_ACTIVITIES,
        metavar="N",
        help="tasks run at once; also the threads for plain-function tasks (default %(default)s)",
    )
    parser.add_argument(
        "--heartbeat-throttle",
        type=_positive_float,
        default=DEFAULT_HEARTBEAT_THROTTLE,
        metavar="SECONDS",
        help="at most this long between heartbeats sent to Temporal, so a cancel reaches a running task within it "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--graceful-shutdown-timeout",
        type=_non_negative_float,
        default=DEFAULT_GRACEFUL_SHUTDOWN,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, time running tasks get to finish before they are cancelled (default %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="give up connecting to Temporal after this long (default %(default)s)",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS (implied by the --tls-* options)")
    parser.add_argument("--tls-cert", type=Path, metavar="PATH", help="client certificate (PEM) for mutual TLS")
    parser.add_argument("--tls-key", type=Path, metavar="PATH", help="client private key (PEM) for mutual TLS")
    parser.add_argument("--tls-ca", type=Path, metavar="PATH", help="CA bundle (PEM) to verify the server")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="(default %(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the worker until SIGINT or SIGTERM; returns the exit status. ``prog`` names the command in messages.

    A process that ends after this should end through :func:`exit_process`.
    """
    parser = build_parser(prog) if prog else build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if (args.tls_cert is None) != (args.tls_key is None):
        return _fail(EXIT_USAGE, "--tls-cert and --tls-key go together")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        tls = _tls(args)
    except OSError as exc:
        return _fail(EXIT_USAGE, f"cannot read a TLS file: {exc}")
    try:
        return asyncio.run(_serve(args, tls))
    except KeyboardInterrupt:
        return EXIT_OK


async def _serve(args: argparse.Namespace, tls: bool | TLSConfig) -> int:
    where = f"Temporal at {args.target_host} (namespace {args.namespace!r})"
    options: dict[str, Any] = {"namespace": args.namespace, "tls": tls}
    if os.environ.get(API_KEY_ENV):
        options["api_key"] = os.environ[API_KEY_ENV]
    try:
        client = await asyncio.wait_for(Client.connect(args.target_host, **options), args.connect_timeout)
    except Exception as exc:
        reason = f"no answer within {args.connect_timeout:g}s" if isinstance(exc, asyncio.TimeoutError) else str(exc)
        return _fail(EXIT_UNAVAILABLE, f"cannot connect to {where}: {reason}")
    loop = asyncio.get_running_loop()
    loop.set_default_executor(
        ThreadPoolExecutor(max_workers=args.max_concurrent_activities, thread_name_prefix="wove-task")
    )
    worker = build_worker(
        client,
        args.task_queue,
        max_concurrent_activities=args.max_concurrent_activities,
        max_heartbeat_throttle_interval=timedelta(seconds=args.heartbeat_throttle),
        graceful_shutdown_timeout=timedelta(seconds=args.graceful_shutdown_timeout),
    )
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    running = asyncio.ensure_future(worker.run())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({running}, timeout=0.2)  # a refused namespace fails the worker's start at once
        if not running.done():
            logger.info("polling task queue %r on %s", args.task_queue, where)
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not running.done():
            logger.info("stopping: running tasks get %gs to finish", args.graceful_shutdown_timeout)
            await worker.shutdown()
        error = running.exception() if running.done() and not running.cancelled() else None
    finally:
        stopping.cancel()
        await close_connections()
    if error is not None:
        code = EXIT_UNAVAILABLE if "validation failed" in str(error).lower() else EXIT_FAILED
        return _fail(code, f"worker on {where} failed: {error}")
    return EXIT_OK


def _tls(args: argparse.Namespace) -> bool | TLSConfig:
    if args.tls_cert is None and args.tls_ca is None:
        return bool(args.tls)
    return TLSConfig(
        server_root_ca_cert=args.tls_ca.read_bytes() if args.tls_ca else None,
        client_cert=args.tls_cert.read_bytes() if args.tls_cert else None,
        client_private_key=args.tls_key.read_bytes() if args.tls_key else None,
    )


def _fail(code: int, message: str) -> int:
    print(f"wove temporal worker: {message}", file=sys.stderr)
    return code


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value:g}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def exit_process(code: int) -> NoReturn:
    """Flush output and end the process with ``code`` without interpreter teardown.

    temporalio's native threads can outlive the event loop and abort a finalizing interpreter ("PyGILState_Release:
    thread state must be current"), turning a clean exit into SIGABRT; ``os._exit`` skips that teardown.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
