"""``wove worker BACKEND``: start a task system's own worker, set up to run wove's tasks.

Each backend keeps its own worker command. This one assembles it (the module that registers wove's task, wove's
queue, the broker) and replaces itself with it (``exec`` of ``python -m <backend CLI>``), so signals, logging and every
option behave exactly as the backend documents, and the worker runs under this interpreter, where wove is installed.
Options this command does not know, and everything after ``--``, go to the backend's worker unchanged.

With ``--environment NAME`` the broker and queue come from that environment of ``wove_config.py``, so a worker takes
work from exactly where the weave sends it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wove.errors import BackendUnavailableError, ConfigError
from wove.integrations.base import DISPATCH_MODULES, check_modules

__all__ = ["BACKENDS", "WorkerCommand", "add_parser", "build_command", "run"]

#: Exit status when the backend's package is missing (argparse's usage errors exit 2).
EXIT_MISSING = 1
#: The task names the shipped worker modules register (an environment naming another needs its own worker).
TASK_NAMES = {"celery": "wove.run_payload", "taskiq": "wove.run", "arq": "wove.run"}


@dataclass(frozen=True)
class WorkerCommand:
    """The worker to run: its argument vector and the variables added to this process's environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def shell(self) -> str:
        """The command as a shell line (``VAR=value ... python -m ...``), for ``--print-command`` and logs."""
        assignments = [f"{key}={shlex.quote(value)}" for key, value in sorted(self.env.items())]
        return " ".join([*assignments, shlex.join(self.argv)])


@dataclass(frozen=True)
class Backend:
    """How to start one backend's worker for wove."""

    name: str
    extra: str
    modules: tuple[str, ...]
    summary: str
    registers: str
    options: Callable[[argparse._ArgumentGroup], None]
    command: Callable[[argparse.Namespace, Mapping[str, Any], list[str]], WorkerCommand]
    notes: str = ""

    @property
    def install(self) -> str:
        return f"pip install 'wove[{self.extra}]'"


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


def _pick(given: str | None, config: Mapping[str, Any], key: str, variable: str | None = None) -> str | None:
    """An option's value: the command line, else the environment's ``executor_config``, else ``$variable``."""
    if given:
        return given
    value = config.get(key)
    if isinstance(value, str) and value:
        return value
    if variable is None:
        return None
    return os.environ.get(variable) or None


def _has_option(args: Sequence[str], short: str, long: str) -> bool:
    """Whether the worker's own options already set ``short``/``long`` (also as ``-Qx`` or ``--long=x``)."""
    return any((arg.startswith(short) and not arg.startswith("--")) or arg.split("=", 1)[0] == long for arg in args)


def _no_object(config: Mapping[str, Any], keys: tuple[str, ...], given: str | None, option: str) -> None:
    """Refuse an environment that hands the adapter a client object (a Redis connection, a pool), unless ``option``
    says where the worker connects: the object's address cannot be read back reliably."""
    found = next((key for key in keys if config.get(key) is not None and not isinstance(config.get(key), str)), None)
    if found is not None and not given:
        raise ConfigError(f"the environment gives executor_config[{found!r}] as an object, not a URL: pass {option}")


# -- celery ------------------------------------------------------------------------------------------------------------


def _celery_options(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--broker", metavar="URL", help="broker URL (sets $WOVE_CELERY_BROKER_URL)")
    parser.add_argument("--queue", metavar="NAME", help="queue to consume (-Q; default: the environment's, else wove)")


def _celery_command(args: argparse.Namespace, config: Mapping[str, Any], rest: list[str]) -> WorkerCommand:
    if config.get("app") is not None or config.get("task_name", TASK_NAMES["celery"]) != TASK_NAMES["celery"]:
        raise ConfigError(
            "the environment sends with its own Celery app or task name: start that app's worker "
            "(celery -A yourproject worker -Q <queue>) after register(app) from wove.integrations.celery_worker"
        )
    env: dict[str, str] = {}
    broker = _pick(args.broker, config, "broker_url")
    if broker:
        env["WOVE_CELERY_BROKER_URL"] = broker
    argv = _python("celery", "-A", "wove.integrations.celery_worker", "worker")
    if not _has_option(rest, "-Q", "--queues"):
        argv += ["-Q", _pick(args.queue, config, "queue", "WOVE_CELERY_QUEUE") or "wove"]
    return WorkerCommand([*argv, *rest], env)


# -- rq ----------------------------------------------------------------------------------------------------------------


def _rq_options(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--url", metavar="URL", help="Redis URL (rq's -u; default: the environment's redis_url)")
    parser.add_argument("--queue", metavar="NAME", help="queue to work on (default: the environment's, else wove)")
    parser.add_argument(
        "--fork",
        action="store_true",
        help="a work horse per job (wove.integrations.rq_worker.Worker): a cancel stops a running task and a crash "
        "kills only the horse; default: SimpleWorker, no fork per job",
    )


def _rq_command(args: argparse.Namespace, config: Mapping[str, Any], rest: list[str]) -> WorkerCommand:
    _no_object(config, ("queue", "connection"), args.url, "--url")
    worker_class = "Worker" if args.fork else "SimpleWorker"
    argv = _python("rq.cli", "worker", "-w", f"wove.integrations.rq_worker.{worker_class}")
    url = _pick(args.url, config, "redis_url")
    if url:
        argv += ["-u", url]
    queue = _pick(args.queue, config, "queue_name") or "wove"
    return WorkerCommand([*argv, *rest, queue])


# -- arq ---------------------------------------------------------------------------------------------------------------


def _arq_options(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--redis-url", metavar="URL", help="Redis URL (sets $WOVE_ARQ_REDIS_URL)")
    parser.add_argument("--queue", metavar="NAME", help="queue to take jobs from (sets $WOVE_ARQ_QUEUE; arq:wove)")


def _arq_command(args: argparse.Namespace, config: Mapping[str, Any], rest: list[str]) -> WorkerCommand:
    if config.get("function", TASK_NAMES["arq"]) != TASK_NAMES["arq"]:
        raise ConfigError(
            "the environment enqueues another job function: add wove_function from wove.integrations.arq_worker to "
            "your own WorkerSettings under that name, and run arq with those settings"
        )
    _no_object(config, ("redis_settings", "pool"), args.redis_url, "--redis-url")
    env: dict[str, str] = {}
    url = _pick(args.redis_url, config, "redis_settings")  # only when it is given as a URL
    if url:
        env["WOVE_ARQ_REDIS_URL"] = url
    queue = _pick(args.queue, config, "queue_name")
    if queue:
        env["WOVE_ARQ_QUEUE"] = queue
    return WorkerCommand([*_python("arq", "wove.integrations.arq_worker.WorkerSettings"), *rest], env)


# -- taskiq ------------------------------------------------------------------------------------------------------------


def _taskiq_options(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--broker-url", metavar="URL", help="Redis URL (sets $WOVE_TASKIQ_BROKER_URL)")
    parser.add_argument("--queue", metavar="NAME", help="Redis list to take tasks from (sets $WOVE_TASKIQ_QUEUE; wove)")


def _taskiq_command(args: argparse.Namespace, config: Mapping[str, Any], rest: list[str]) -> WorkerCommand:
    if config.get("broker") is not None or config.get("task_name", TASK_NAMES["taskiq"]) != TASK_NAMES["taskiq"]:
        raise ConfigError(
            "the environment kicks through its own Taskiq broker or task name: start a worker for that broker "
            "(taskiq worker yourproject.module:broker) after register(broker) from wove.integrations.taskiq_worker"
        )
    env: dict[str, str] = {}
    for variable, value in (
        ("WOVE_TASKIQ_BROKER_URL", _pick(args.broker_url, config, "broker_url")),
        ("WOVE_TASKIQ_QUEUE", _pick(args.queue, config, "queue_name")),
        ("WOVE_TASKIQ_CANCEL_CHANNEL", _pick(None, config, "cancel_channel")),
    ):
        if value:
            env[variable] = value
    return WorkerCommand([*_python("taskiq", "worker", "wove.integrations.taskiq_worker:broker"), *rest], env)


# -- temporal ----------------------------------------------------------------------------------------------------------


def _temporal_options(parser: argparse._ArgumentGroup) -> None:
    """None of its own: ``--target-host``, ``--namespace``, ``--task-queue`` ... are the worker module's."""


def _temporal_command(args: argparse.Namespace, config: Mapping[str, Any], rest: list[str]) -> WorkerCommand:
    _no_object(
        config,
        ("client",),
        "--target-host" if _has_option(rest, "--target-host", "--target-host") else None,
        "--target-host HOST:PORT (and --namespace) to the worker",
    )
    argv = _python("wove.integrations.temporal_worker")
    for key, option in (("target_host", "--target-host"), ("namespace", "--namespace"), ("task_queue", "--task-queue")):
        value = _pick(None, config, key)
        if value and not _has_option(rest, option, option):
            argv += [option, value]
    return WorkerCommand([*argv, *rest])


BACKENDS: dict[str, Backend] = {
    backend.name: backend
    for backend in (
        Backend(
            "celery",
            "celery",
            ("celery",),
            "a Celery worker (celery -A wove.integrations.celery_worker worker -Q wove)",
            "the Celery app wove.integrations.celery_worker, with wove's task wove.run_payload registered",
            _celery_options,
            _celery_command,
            "Without -Q among the worker's own options, it consumes --queue. More settings: $WOVE_CELERY_CONFIG "
            "(a module of Celery settings). Example: wove worker celery --broker redis://broker:6379/0 -- "
            "--concurrency 8 --loglevel INFO",
        ),
        Backend(
            "rq",
            "rq",
            ("rq", "redis"),
            "an RQ worker (rq worker -w wove.integrations.rq_worker.SimpleWorker wove)",
            "nothing: RQ imports wove.integrations.rq_worker.run_payload by name; the worker class preloads it",
            _rq_options,
            _rq_command,
            "Example: wove worker rq --url redis://broker:6379/0 -- --burst",
        ),
        Backend(
            "arq",
            "arq",
            ("arq",),
            "an ARQ worker (arq wove.integrations.arq_worker.WorkerSettings)",
            "wove.integrations.arq_worker.WorkerSettings, with wove's job function wove.run and aborts allowed",
            _arq_options,
            _arq_command,
            "$WOVE_ARQ_POLL_DELAY, $WOVE_ARQ_MAX_JOBS and $WOVE_ARQ_JOB_TIMEOUT tune it. Example: wove worker arq "
            "--redis-url redis://broker:6379/0",
        ),
        Backend(
            "taskiq",
            "taskiq",
            ("taskiq", "taskiq_redis"),
            "a Taskiq worker (taskiq worker wove.integrations.taskiq_worker:broker)",
            "wove.integrations.taskiq_worker:broker, a taskiq-redis ListQueueBroker with wove's task wove.run and "
            "the listener that cancels runs",
            _taskiq_options,
            _taskiq_command,
            "Example: wove worker taskiq --broker-url redis://broker:6379/0 -- --workers 4",
        ),
        Backend(
            "temporal",
            "temporal",
            ("temporalio",),
            "a Temporal worker (python -m wove.integrations.temporal_worker)",
            "the WoveRun workflow and the activity that runs wove tasks, polling the task queue",
            _temporal_options,
            _temporal_command,
            "Its options (--target-host, --namespace, --task-queue, --tls ...) are the worker's own: see "
            "wove worker temporal -- --help. Example: wove worker temporal --environment jobs -- --log-level DEBUG",
        ),
    )
}

_NO_WORKER = (
    "Other executors need no worker command: process starts its own worker processes; dask and ray workers need only "
    "wove installed; slurm, aws_batch and kubernetes_jobs run each task as a job (python -m wove.backend_worker)."
)


def add_parser(commands: Any) -> None:
    """Add ``wove worker`` and one subcommand per backend to the ``wove`` parser's subcommands."""
    worker = commands.add_parser(
        "worker",
        help="start a backend's worker, set up to run wove's tasks",
        description="Start a task system's own worker with wove's task registered, on wove's queue. Options not "
        "listed under a backend, and everything after --, go to the backend's worker unchanged. The command "
        "replaces itself with the worker (exec), so signals and exit status are the worker's.",
        epilog=_NO_WORKER,
        allow_abbrev=False,
    )
    backends = worker.add_subparsers(dest="backend", metavar="BACKEND", required=True)
    for backend in BACKENDS.values():
        sub = backends.add_parser(
            backend.name,
            help=backend.summary,
            description=f"Start {backend.summary}. Registers: {backend.registers}. Options not listed here, and "
            f"everything after --, go to the worker unchanged. Needs {backend.install} on the worker.",
            epilog=backend.notes,
            allow_abbrev=False,
        )
        group = sub.add_argument_group("options wove adds")
        group.add_argument("--config", metavar="PATH", help="wove_config.py to read --environment from")
        group.add_argument(
            "--environment",
            metavar="NAME",
            help="take the broker and queue from this environment's executor_config (options given here win)",
        )
        group.add_argument(
            "--print-command", action="store_true", help="print the worker command instead of running it"
        )
        backend.options(group)
        sub.set_defaults(handler=run, accepts_rest=True)


def build_command(args: argparse.Namespace, rest: list[str]) -> WorkerCommand:
    """The worker command for parsed ``args`` and the options meant for the backend's worker."""
    backend = BACKENDS[args.backend]
    config: Mapping[str, Any] = {}
    if args.environment:
        config = _environment_config(args.environment, args.config, backend.name)
    elif args.config:
        raise ConfigError("--config is read only with --environment NAME")
    return backend.command(args, config, list(rest))


def _environment_config(name: str, path: str | None, executor: str) -> Mapping[str, Any]:
    from wove.config_file import load_settings

    settings, file = load_settings(path)
    definition = settings.environment(name)
    used = definition.get("executor", "local")
    if used != executor:
        raise ConfigError(f"environment {name!r} in {file} uses executor {used!r}, not {executor!r}")
    config: Mapping[str, Any] = definition.get("executor_config") or {}
    return config


def run(args: argparse.Namespace, rest: list[str]) -> int:
    """Replace this process with the backend's worker (or print it); 1 when the backend's package is missing."""
    try:
        command = build_command(args, rest)
    except (ConfigError, NameError) as exc:  # NameError: UnknownEnvironmentError
        print(f"wove worker: {exc}", file=sys.stderr)
        return 2
    if args.print_command:
        print(command.shell())
        return 0
    backend = BACKENDS[args.backend]
    try:
        check_modules((*backend.modules, *DISPATCH_MODULES), backend.install, what=f"wove worker {backend.name}")
    except BackendUnavailableError as exc:
        print(f"{exc} (interpreter: {sys.executable})", file=sys.stderr)
        return EXIT_MISSING
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command.argv[0], command.argv, {**os.environ, **command.env})
