"""``TemporalAdapter``: runs each wove run as one Temporal workflow execution on a task queue your workers poll.

Each run starts the ``WoveRun`` workflow (``wove.integrations.temporal_workflow``) under the id
``<workflow_id_prefix><task name>-<run id>``; the workflow runs one activity, ``wove_run_payload``, which executes the
payload through wove's worker entrypoint (``python -m wove.integrations.temporal_worker`` runs both). The result comes
back over wove's callback server, never through Temporal: ``submit`` returns once the workflow is started.

Retries belong to wove (each attempt is a new run and a new workflow), so the activity's retry policy defaults to
``maximum_attempts=1``. Cancelling a run cancels its workflow; the workflow cancels the activity, which stops the task
(an ``async def`` task where it awaits; a plain function runs to its end in its thread) and the workflow ends
``CANCELED``. The adapter follows every workflow to its end: one that ends without the worker having reported an
outcome (terminated, timed out, its activity failed before the task ran, its worker lost) ends the run at once with
``DeliveryLostError`` carrying Temporal's reason.

The payload travels in the workflow input, which Temporal stores in the workflow history, readable by anyone with
read access to the namespace. Its run credential is only good while the run is pending; bodies above
``inline_payload_limit`` stay on the callback server.

Config keys (``executor_config``): ``client`` (an existing ``temporalio.client.Client``, used as is) or
``target_host`` + ``namespace`` (+ ``tls``, ``api_key``, ``connect_options``); ``task_queue``;
``workflow_id_prefix``; ``start_workflow_options``; ``activity_options``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

from wove._types import Frame
from wove.errors import BackendUnavailableError, ConfigError, SubmitError
from wove.integrations.base import BackendAdapter

if TYPE_CHECKING:
    from temporalio.client import Client, WorkflowHandle

__all__ = [
    "DEFAULT_ACTIVITY_OPTIONS",
    "DEFAULT_TASK_QUEUE",
    "TemporalAdapter",
    "TemporalSubmission",
    "activity_options",
    "start_workflow_options",
    "workflow_id",
]

logger = logging.getLogger("wove.integrations.temporal")

#: Where ``target_host`` points unless it is given (Temporal's own default).
DEFAULT_TARGET_HOST = "localhost:7233"
DEFAULT_NAMESPACE = "default"
#: Task queue the workflows go to unless ``task_queue`` says otherwise; workers must poll the same one.
DEFAULT_TASK_QUEUE = "wove"
DEFAULT_WORKFLOW_ID_PREFIX = "wove-"
#: Characters of the task name kept in a workflow id; the full run id always follows, so ids stay unique.
TASK_NAME_CHARS = 64
#: Longest ``workflow_id_prefix`` accepted (Temporal's default id limit is 1,000 characters).
MAX_PREFIX_CHARS = 200
#: Activity options unless ``activity_options`` overrides them (seconds). The retry policy makes one attempt: wove's
#: ``retries`` decide, each attempt a new run. Cancellation waits for the activity to confirm, so a workflow shown
#: ``CANCELED`` has really stopped its task.
DEFAULT_ACTIVITY_OPTIONS: dict[str, Any] = {
    "start_to_close_timeout": 24 * 3600.0,
    "heartbeat_timeout": 30.0,
    "retry_policy": {"maximum_attempts": 1},
    "cancellation_type": "WAIT_CANCELLATION_COMPLETED",
}
#: ``start_workflow`` arguments wove sets itself, or that would run a payload twice (workflow retries, cron).
RESERVED_START_OPTIONS = frozenset(
    {"workflow", "arg", "args", "id", "task_queue", "result_type", "retry_policy", "cron_schedule", "stack_level"}
)
#: ``start_workflow`` arguments given in seconds (a ``timedelta`` works too).
START_DURATIONS = ("execution_timeout", "run_timeout", "task_timeout", "start_delay", "rpc_timeout")
#: ``Client.connect`` arguments that have keys of their own in ``executor_config``.
RESERVED_CONNECT_OPTIONS = frozenset({"target_host", "namespace", "tls", "api_key"})
#: Seconds to wait for ``Client.connect`` in ``start``.
CONNECT_TIMEOUT = 15.0
#: Seconds a workflow's end waits before it is reported, so the outcome its worker posted just before wins.
RESULT_GRACE = 0.5
#: Seconds between attempts to follow a workflow after the server could not be reached.
FOLLOW_RETRY_DELAY = 1.0

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class TemporalSubmission:
    """The workflow of one run; the weave's records show its id as the run's ``submission``."""

    workflow_id: str
    #: Temporal's id of the execution (not wove's run id).
    execution_run_id: str | None = None

    def __str__(self) -> str:
        return self.workflow_id


@dataclass(eq=False)
class _Followed:
    run_id: str
    task_id: Any
    handle: WorkflowHandle[Any, Any]
    cancelled: bool = False
    follower: asyncio.Task[None] | None = field(default=None, repr=False)


def workflow_id(prefix: str, task_name: Any, run_id: str) -> str:
    """``<prefix><task name>-<run id>``, the task name made safe and cut to ``TASK_NAME_CHARS``, the run id whole."""
    name = _UNSAFE.sub("-", str(task_name or "task")).strip("-.") or "task"
    return f"{prefix}{name[:TASK_NAME_CHARS]}-{run_id}"


def activity_options(given: Any) -> dict[str, Any]:
    """The JSON-safe activity options the workflow receives: ``DEFAULT_ACTIVITY_OPTIONS`` updated with ``given``.

    Durations may be seconds or ``timedelta``; ``retry_policy`` a dict or a ``RetryPolicy``; ``cancellation_type`` a
    name or an ``ActivityCancellationType``. ``None`` removes a default (``heartbeat_timeout: None``: no heartbeat
    timeout).
    """
    from wove.integrations.temporal_workflow import DURATION_OPTIONS, RETRY_DURATIONS, activity_kwargs

    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"executor_config['activity_options'] must be a dict, got {given!r}")
    options = {key: value for key, value in DEFAULT_ACTIVITY_OPTIONS.items()}
    options["retry_policy"] = dict(DEFAULT_ACTIVITY_OPTIONS["retry_policy"])
    for key, value in given.items():
        where = f"executor_config['activity_options'][{key!r}]"
        if key in DURATION_OPTIONS:
            options[key] = None if value is None else _seconds(value, where)
        elif key == "retry_policy":
            policy = _retry_policy(value, where)
            for name in RETRY_DURATIONS:
                if policy.get(name) is not None:
                    policy[name] = _seconds(policy[name], f"{where}[{name!r}]")
            options[key] = {**options[key], **policy}
        elif key == "cancellation_type":
            options[key] = getattr(value, "name", value)
        else:
            options[key] = value
    options = {key: value for key, value in options.items() if value is not None}
    if "start_to_close_timeout" not in options and "schedule_to_close_timeout" not in options:
        raise ConfigError(
            "executor_config['activity_options'] needs start_to_close_timeout or schedule_to_close_timeout (seconds)"
        )
    try:
        activity_kwargs(options)  # what the workflow will do with them
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"executor_config['activity_options'] is invalid: {exc!r}") from None
    return options


def start_workflow_options(given: Any) -> dict[str, Any]:
    """``Client.start_workflow`` keyword arguments from ``start_workflow_options``; seconds become ``timedelta``."""
    from temporalio.client import Client

    if given is None:
        return {}
    why = "wove sets the workflow, its id, input and task queue, and retries runs itself (use the task's retries)"
    options = _client_options("start_workflow_options", given, RESERVED_START_OPTIONS, Client.start_workflow, why)
    for key in START_DURATIONS:
        if options.get(key) is not None:
            options[key] = timedelta(
                seconds=_seconds(options[key], f"executor_config['start_workflow_options'][{key!r}]")
            )
    return options


class TemporalAdapter(BackendAdapter):
    """Starts one ``WoveRun`` workflow per run and follows it to its end; cancels by cancelling the workflow."""

    backend: ClassVar[str] = "temporal"
    required_modules: ClassVar[tuple[str, ...]] = ("temporalio",)
    install_hint: ClassVar[str] = "pip install 'wove[temporal]'"
    #: The payload is the workflow's input and the activity's input, both kept in the workflow history. Temporal
    #: rejects payloads over 2 MB and warns from 512 KB; bodies above 128 KiB stay on the callback server.
    inline_payload_limit: ClassVar[int | None] = 128 * 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = self.config
        given = config.get("client")
        if given is not None and not callable(getattr(given, "start_workflow", None)):
            raise ConfigError(f"executor_config['client'] must be a temporalio.client.Client, got {given!r}")
        self.client: Client | None = given
        self._given_client = given is not None
        self.target_host = _text(config, "target_host", DEFAULT_TARGET_HOST)
        self.namespace = _text(config, "namespace", DEFAULT_NAMESPACE)
        self.task_queue = _text(config, "task_queue", DEFAULT_TASK_QUEUE)
        self.workflow_id_prefix = _prefix(config.get("workflow_id_prefix", DEFAULT_WORKFLOW_ID_PREFIX))
        self.connect_options = _connect_options(config)
        self.start_options = start_workflow_options(config.get("start_workflow_options"))
        self.activity_options = activity_options(config.get("activity_options"))
        self._runs: dict[str, _Followed] = {}
        self._closed = False

    # -- adapter contract ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the client once (unless one was given); a wrong address or credential fails here."""
        if self.client is not None:
            return
        from temporalio.client import Client

        try:
            self.client = await asyncio.wait_for(
                Client.connect(self.target_host, namespace=self.namespace, **self.connect_options), CONNECT_TIMEOUT
            )
        except Exception as exc:
            reason = "no answer" if isinstance(exc, asyncio.TimeoutError) else f"{type(exc).__name__}: {exc}"
            message = f"cannot connect to Temporal at {self.target_host} (namespace {self.namespace!r}): {reason}"
            raise BackendUnavailableError(f"environment {self.name!r}: {message}", environment=self.name) from exc

    async def submit(self, payload: Frame, frame: Frame) -> TemporalSubmission:
        """Start the run's workflow and return at once; the outcome comes back over the callback server."""
        from wove.integrations.temporal_workflow import WORKFLOW_NAME

        run_id = str(frame["run_id"])
        if self.client is None or self._closed:
            raise SubmitError("the temporal adapter is not running", environment=self.name, run_id=run_id)
        wid = workflow_id(self.workflow_id_prefix, frame.get("task_name"), run_id)
        with self.translate_errors(f"starting workflow {wid}", run_id=run_id):
            handle = await self.client.start_workflow(
                WORKFLOW_NAME,
                args=[payload, self.activity_options],
                id=wid,
                task_queue=self.task_queue,
                **self.start_options,
            )
        run = _Followed(run_id, frame.get("task_id"), handle)
        self._runs[run_id] = run
        run.follower = asyncio.get_running_loop().create_task(self._follow(run))
        return TemporalSubmission(wid, handle.first_execution_run_id or handle.result_run_id)

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """Request cancellation of the workflow; it cancels its activity and ends ``CANCELED``."""
        from temporalio.service import RPCError, RPCStatusCode

        run = self._runs.pop(run_id, None)
        if run is not None:
            run.cancelled = True
            if run.follower is not None:
                run.follower.cancel()
            handle = run.handle
        elif isinstance(submission, TemporalSubmission) and self.client is not None:
            handle = self.client.get_workflow_handle(submission.workflow_id)
        else:
            return  # never started
        try:
            with self.translate_errors(f"cancelling workflow {handle.id}", run_id=run_id):
                await handle.cancel()
        except SubmitError as exc:
            if isinstance(exc.__cause__, RPCError) and exc.__cause__.status == RPCStatusCode.NOT_FOUND:
                logger.debug("environment %r: workflow %s had already ended", self.name, handle.id)
                return
            raise

    async def close(self) -> None:
        """Stop following workflows (they go on in Temporal) and drop the client wove connected."""
        if self._closed:
            return
        self._closed = True
        followers = [run.follower for run in self._runs.values() if run.follower is not None]
        self._runs.clear()
        for follower in followers:
            follower.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        if not self._given_client:
            self.client = None  # temporalio clients have no close; the connection goes with the last reference

    def run_ended(self, run_id: str) -> None:
        """The run has its outcome: stop following its workflow (which finishes on its own in Temporal)."""
        run = self._runs.pop(run_id, None)
        if run is not None and run.follower is not None:
            run.follower.cancel()

    # -- following workflows ---------------------------------------------------------------------------------

    async def _follow(self, run: _Followed) -> None:
        """Wait for the workflow's end; report it when the worker may not have (the executor drops it otherwise)."""
        from temporalio.client import WorkflowFailureError
        from temporalio.service import RPCError, RPCStatusCode

        cause: BaseException | None = None
        failures = 0
        while True:
            try:
                await run.handle.result()
                break
            except WorkflowFailureError as exc:
                cause = exc.cause
                break
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    cause = exc
                    break
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG  # once per run, not once a second
                logger.log(level, "environment %r: cannot follow workflow %s: %s", self.name, run.handle.id, exc)
                await asyncio.sleep(FOLLOW_RETRY_DELAY)
            except Exception as exc:
                cause = exc
                break
        await asyncio.sleep(RESULT_GRACE)
        if run.cancelled or self._runs.pop(run.run_id, None) is None:
            return
        self._report(run, cause)

    def _report(self, run: _Followed, cause: BaseException | None) -> None:
        from temporalio.exceptions import CancelledError, TerminatedError
        from temporalio.exceptions import TimeoutError as TemporalTimeoutError

        ids = {"run_id": run.run_id, "task_id": run.task_id}
        workflow = f"Temporal workflow {run.handle.id}"
        if cause is None:
            self.report_lost(ids, f"{workflow} completed but its worker reported no outcome", kind="NoOutcome")
        elif isinstance(cause, CancelledError):
            logger.info("environment %r: %s was cancelled outside wove", self.name, workflow)
            self.emit({"type": "task_cancelled", "run_id": run.run_id, "task_id": run.task_id, "at": time.time()})
        elif isinstance(cause, TerminatedError):
            reason = cause.message or "no reason given"
            self.report_lost(ids, f"{workflow} was terminated: {reason}", kind="WorkflowTerminated", retryable=False)
        elif isinstance(cause, TemporalTimeoutError):
            self.report_lost(ids, f"{workflow} timed out: {failure_text(cause)}", kind="WorkflowTimedOut")
        else:
            self.report_lost(ids, f"{workflow} failed: {failure_text(cause)}", kind="WorkflowFailed")


def failure_text(exc: BaseException) -> str:
    """Temporal's failure chain in one line, outermost first: ``Activity task failed: activity Heartbeat timeout``."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) < 8:
        message = str(getattr(current, "message", "") or current) or type(current).__name__
        kind = getattr(current, "type", None)
        kind = getattr(kind, "name", kind)
        parts.append(f"{message} ({kind})" if kind and str(kind) not in message else message)
        current = current.__cause__
    return ": ".join(parts)


# -- configuration helpers ---------------------------------------------------------------------------------------


def _text(config: Mapping[str, Any], key: str, default: str) -> str:
    value = config.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"executor_config[{key!r}] must be a non-empty string, got {value!r}")
    return value


def _prefix(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_PREFIX_CHARS or _UNSAFE.search(value):
        raise ConfigError(
            f"executor_config['workflow_id_prefix'] must be a string of at most {MAX_PREFIX_CHARS} letters, digits,"
            f" '.', '_' or '-', got {value!r}"
        )
    return value


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"{where} must be seconds > 0 (or a timedelta), got {value!r}")
    return float(value)


def _retry_policy(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        from temporalio.common import RetryPolicy

        if not isinstance(value, RetryPolicy):
            raise ConfigError(f"{where} must be a dict or a temporalio.common.RetryPolicy, got {value!r}")
        value = {name: getattr(value, name) for name in RetryPolicy.__dataclass_fields__}
    policy = dict(value)
    if policy.get("non_retryable_error_types") is not None:
        policy["non_retryable_error_types"] = [str(kind) for kind in policy["non_retryable_error_types"]]
    return policy


def _client_options(key: str, given: Any, reserved: frozenset[str], method: Any, why: str) -> dict[str, Any]:
    """``executor_config[key]`` as keyword arguments of a client ``method``: a dict, none of ``reserved``, every
    name one the method takes."""
    if not isinstance(given, Mapping):
        raise ConfigError(f"executor_config[{key!r}] must be a dict, got {given!r}")
    clashing = sorted(reserved.intersection(given))
    if clashing:
        raise ConfigError(f"executor_config[{key!r}] may not set {', '.join(clashing)}: {why}")
    unknown = sorted(set(given) - set(inspect.signature(method).parameters))
    if unknown:
        name = getattr(method, "__qualname__", "the client")
        raise ConfigError(f"executor_config[{key!r}] has options {name} does not know: {', '.join(unknown)}")
    return dict(given)


def _connect_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """``Client.connect`` keyword arguments besides the address and namespace."""
    from temporalio.client import Client

    given = config.get("connect_options") or {}
    why = "use executor_config keys of the same name"
    options = _client_options("connect_options", given, RESERVED_CONNECT_OPTIONS, Client.connect, why)
    if config.get("tls") is not None:
        options["tls"] = config["tls"]
    if config.get("api_key") is not None:
        options["api_key"] = config["api_key"]
    return options
