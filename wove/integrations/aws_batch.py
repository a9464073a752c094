"""``AwsBatchAdapter``: runs each remote task as one AWS Batch job running ``python -m wove.backend_worker``.

Each run becomes one SubmitJob on ``job_queue`` with ``job_definition``, which provides the image (with
``wove[dispatch]`` installed), resources, role and logging. The container's command is overridden with
``[python, "-m", "wove.backend_worker"]`` and the payload travels in the ``WOVE_BACKEND_PAYLOAD`` variable of the
job's ``containerOverrides``. Job names are ``<job_name_prefix><task name>-<run id>``: valid for AWS Batch (letters,
digits, ``-`` and ``_``, at most 128), and unique, since only the task name part is ever shortened.

Sizes: ECS refuses, when the job starts, a task whose container overrides exceed 8,192 characters (AWS Batch adds
its own variables to them), and SubmitJob takes at most 30 KiB. So pickled bodies above ``inline_payload_limit``
(4 KiB) stay on the callback server and the worker fetches them, which keeps wove's overrides under 4.7 KB; a
request that would still exceed ``MAX_OVERRIDES_CHARS`` (a large ``container_overrides`` environment, a raised
limit) is refused with ``ConfigError`` instead of failing later on AWS.

Watching: one task per environment calls DescribeJobs (up to 100 jobs a call) every ``poll_interval`` seconds for
the jobs of unfinished runs. A job AWS Batch ends FAILED before wove's worker reported (an image that cannot be
pulled, a command that cannot start, an image without wove, a killed container) ends its run with
``DeliveryLostError`` carrying the job's ``statusReason``, the container's reason and exit code, its log stream and
the tail of its CloudWatch log. A worker posts its outcome before it exits, so a job whose container ran is reported
only ``finish_grace`` seconds after it ended: an outcome still on its way wins. A job SUCCEEDED with no outcome is an
error too. Cancelling calls TerminateJob, which also cancels a job that has not started.

Config keys (``executor_config``): ``client`` (an existing boto3 ``batch`` client, used as is) or ``region_name``,
``endpoint_url`` and ``client_options`` (for the client wove creates); ``logs_client`` or ``logs_endpoint_url`` (for
log tails); ``job_queue`` and ``job_definition`` (required); ``job_name_prefix``; ``submit_options`` (passed to
SubmitJob); ``container_overrides``; ``python``; ``poll_interval``; ``finish_grace``; ``log_group``;
``log_tail_lines``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from wove._types import Frame
from wove.errors import BackendUnavailableError, ConfigError, SubmitError, WoveError
from wove.integrations.base import BackendAdapter

__all__ = ["AwsBatchAdapter", "AwsBatchSubmission", "JobEnd", "container_overrides", "job_end", "job_name"]

logger = logging.getLogger("wove.integrations.aws_batch")

#: The environment variable the worker reads its payload from.
PAYLOAD_ENV = "WOVE_BACKEND_PAYLOAD"
#: The module the job's command runs.
WORKER_MODULE = "wove.backend_worker"
DEFAULT_PREFIX = "wove-"
#: AWS Batch job names: a letter or digit, then letters, digits, hyphens and underscores; 128 at most.
MAX_JOB_NAME = 128
MAX_PREFIX = 48
#: ECS refuses container overrides longer than this when it launches the job's task.
ECS_OVERRIDES_LIMIT = 8192
#: Characters of that limit left for the variables AWS Batch adds (job id, queue, compute environment, attempt).
BATCH_RESERVE = 1024
#: The longest container overrides (JSON) wove submits.
MAX_OVERRIDES_CHARS = ECS_OVERRIDES_LIMIT - BATCH_RESERVE
#: The largest SubmitJob request AWS Batch accepts (bytes of JSON).
SUBMIT_JOB_LIMIT = 30 * 1024
#: DescribeJobs takes at most this many job ids a call.
DESCRIBE_BATCH = 100
DEFAULT_POLL_INTERVAL = 2.0
DEFAULT_FINISH_GRACE = 2.0
DEFAULT_LOG_GROUP = "/aws/batch/job"
DEFAULT_LOG_TAIL_LINES = 20
#: Seconds a job may be missing from DescribeJobs (just submitted, or expired) before its run is reported lost.
VANISH_AFTER = 60.0
#: Seconds to wait for CloudWatch Logs when reading a failed job's output.
LOG_TIMEOUT = 10.0
#: SubmitJob parameters wove sets itself, with where to put what they would have said.
RESERVED_SUBMIT_OPTIONS = {
    "jobName": "executor_config['job_name_prefix']",
    "jobQueue": "executor_config['job_queue']",
    "jobDefinition": "executor_config['job_definition']",
    "containerOverrides": "executor_config['container_overrides']",
    "arrayProperties": "a mapped task (each item is a run and a job)",
    "nodeOverrides": "a single-node job definition",
    "ecsPropertiesOverride": "executor_config['container_overrides']",
    "eksPropertiesOverride": "executor_config['container_overrides']",
}
_NAME_DISALLOWED = re.compile(r"[^A-Za-z0-9_-]+")
_NAME_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_ACCESS_DENIED = frozenset({"AccessDeniedException", "AccessDenied", "UnauthorizedOperation"})


@dataclass(frozen=True)
class AwsBatchSubmission:
    """The AWS Batch job of one run; the weave's records show its job id as the run's ``submission``."""

    job_id: str
    job_name: str

    def __str__(self) -> str:
        return self.job_id


@dataclass(frozen=True)
class JobEnd:
    """How AWS Batch says a job ended: from the job itself, or from its last attempt where the job lacks a field."""

    job_id: str
    job_name: str
    status: str
    status_reason: str
    container_reason: str
    exit_code: int | None
    log_stream: str
    log_group: str | None

    @property
    def ran(self) -> bool:
        """The container ran (it has an exit code): wove's worker may have posted an outcome."""
        return self.exit_code is not None

    def describe(self, what: str) -> str:
        """``AWS Batch job <name> (<id>) <STATUS> <what>: <reason>; <container reason>; <exit code>; <log stream>``."""
        details = [
            f"status reason: {self.status_reason}" if self.status_reason else "",
            f"container: {self.container_reason}" if self.container_reason else "",
            f"exit code {self.exit_code}" if self.exit_code is not None else "",
            f"log stream {self.log_stream}" if self.log_stream else "",
        ]
        headline = f"AWS Batch job {self.job_name} ({self.job_id}) {self.status} {what}"
        return "; ".join([f"{headline}: {details[0]}" if details[0] else headline, *filter(None, details[1:])])


@dataclass(eq=False)
class _Watched:
    run_id: str
    task_id: Any
    job_name: str
    missing_since: float | None = None
    ended: bool = False  # the run already has its outcome (run_ended): nothing left to report


def job_name(prefix: str, task_name: str, run_id: str) -> str:
    """``<prefix><task>-<run id>``, valid for AWS Batch; only the task part is sanitized and shortened."""
    run = run_id if _NAME_VALID.fullmatch(run_id) and len(run_id) <= 64 else _digest(run_id)
    room = MAX_JOB_NAME - len(prefix) - len(run) - 1
    task = _NAME_DISALLOWED.sub("-", task_name).strip("-_")[:room].rstrip("-_") or "task"
    return f"{prefix}{task}-{run}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def container_overrides(base: Mapping[str, Any], command: Sequence[str], payload_text: str) -> dict[str, Any]:
    """The job's ``containerOverrides``: ``base`` with wove's command and the payload variable added."""
    overrides = dict(base)
    overrides["command"] = list(command)
    overrides["environment"] = [*base.get("environment", ()), {"name": PAYLOAD_ENV, "value": payload_text}]
    return overrides


def job_end(job: Mapping[str, Any]) -> JobEnd:
    """Read a DescribeJobs entry of a finished job."""
    container = job.get("container") or {}
    attempts = job.get("attempts") or []
    attempt = attempts[-1] if attempts and isinstance(attempts[-1], Mapping) else {}
    last = attempt.get("container") or {}

    def field(key: str) -> Any:
        value = container.get(key)
        return last.get(key) if value is None or value == "" else value

    exit_code = field("exitCode")
    log_config = container.get("logConfiguration") or {}
    group = (log_config.get("options") or {}).get("awslogs-group") if log_config.get("logDriver") == "awslogs" else None
    return JobEnd(
        job_id=str(job.get("jobId", "")),
        job_name=str(job.get("jobName", "")),
        status=str(job.get("status", "")),
        status_reason=str(job.get("statusReason") or attempt.get("statusReason") or ""),
        container_reason=str(field("reason") or ""),
        exit_code=exit_code if isinstance(exit_code, int) and not isinstance(exit_code, bool) else None,
        log_stream=str(field("logStreamName") or ""),
        log_group=str(group) if group else None,
    )


class AwsBatchAdapter(BackendAdapter):
    """Submits each payload as an AWS Batch job and terminates it on cancel; watches jobs for early failures."""

    backend: ClassVar[str] = "aws_batch"
    required_modules: ClassVar[tuple[str, ...]] = ("boto3",)
    install_hint: ClassVar[str] = "pip install 'wove[aws_batch]'"
    #: Bodies above 4 KiB go by reference, so the payload variable stays under about 4.5 KB and the container
    #: overrides well under the 8,192 characters ECS accepts, with room for AWS Batch's own variables and yours.
    inline_payload_limit: ClassVar[int | None] = 4 * 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = self.config
        self.job_queue = _required(config, "job_queue")
        self.job_definition = _required(config, "job_definition")
        self.prefix = _prefix(config.get("job_name_prefix", DEFAULT_PREFIX))
        self.command = [*_python(config.get("python", "python")), "-m", WORKER_MODULE]
        self.overrides = _overrides(config.get("container_overrides"))
        self.submit_options = _submit_options(config.get("submit_options"))
        self.poll_interval = _seconds(config, "poll_interval", DEFAULT_POLL_INTERVAL, positive=True)
        self.finish_grace = _seconds(config, "finish_grace", DEFAULT_FINISH_GRACE)
        self.log_group: str | None = _optional_text(config, "log_group")
        self.log_tail_lines = _count(config, "log_tail_lines", DEFAULT_LOG_TAIL_LINES)
        self.client_options = dict(_mapping(config, "client_options"))
        self.client: Any = config.get("client")
        self.logs: Any = config.get("logs_client")
        for key, client, method in (
            ("client", self.client, "submit_job"),
            ("logs_client", self.logs, "get_log_events"),
        ):
            if client is not None and not callable(getattr(client, method, None)):
                raise ConfigError(f"executor_config[{key!r}] must be a boto3 client, got {client!r}")
        self._owned: list[Any] = []
        self._watched: dict[str, _Watched] = {}
        self._by_run: dict[str, tuple[str, _Watched]] = {}  # run id -> (job id, watch), until the run ends
        self._poller: asyncio.Task[None] | None = None
        self._reports: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- adapter contract ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the boto3 clients (unless given) and check the job queue exists, off the event loop."""
        try:
            await self.run_blocking(self._connect)
        except WoveError:
            raise
        except Exception as exc:
            message = (
                f"environment {self.name!r} (aws_batch): cannot reach AWS Batch: {type(exc).__name__}: {exc} (check"
                " the AWS credentials and executor_config['region_name'] and 'endpoint_url')"
            )
            raise BackendUnavailableError(message, environment=self.name) from exc

    async def submit(self, payload: Frame, frame: Frame) -> AwsBatchSubmission:
        """SubmitJob for one run; returns once AWS Batch accepted it."""
        run_id = str(frame["run_id"])
        if self._closed:
            raise SubmitError("the aws_batch adapter is closed", environment=self.name, run_id=run_id)
        request = self.request(payload, frame)
        with self.translate_errors("SubmitJob", run_id=run_id):
            response = await self.run_blocking(self.client.submit_job, **request)
        submission = AwsBatchSubmission(str(response["jobId"]), request["jobName"])
        self._watch(submission, frame)
        return submission

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """TerminateJob with a reason naming wove: a queued job is cancelled, a running one's container stopped."""
        if not isinstance(submission, AwsBatchSubmission):
            return  # never submitted
        self._watched.pop(submission.job_id, None)
        reason = f"cancelled by wove (run {run_id})"
        with self.translate_errors("TerminateJob", run_id=run_id):
            await self.run_blocking(self.client.terminate_job, jobId=submission.job_id, reason=reason)

    async def close(self) -> None:
        """Stop watching and close the clients wove created. Jobs keep running: the orphan policy decides."""
        if self._closed:
            return
        self._closed = True
        self._watched.clear()
        self._by_run.clear()
        tasks = [task for task in (self._poller, *self._reports) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in self._owned:
            try:
                await self.run_blocking(client.close)
            except Exception as exc:
                logger.debug("environment %r: closing a boto3 client failed: %r", self.name, exc)
        self._owned.clear()

    # -- submission ------------------------------------------------------------------------------------------

    def request(self, payload: Frame, frame: Frame) -> dict[str, Any]:
        """The SubmitJob parameters for one run; ``ConfigError`` when ECS or AWS Batch would refuse their size."""
        from wove.backend.codec import payload_to_b64

        run_id = str(frame["run_id"])
        overrides = container_overrides(self.overrides, self.command, payload_to_b64(payload))
        request: dict[str, Any] = {
            "retryStrategy": {"attempts": 1},  # wove's retries decide; each attempt is a new run
            **self.submit_options,
            "jobName": job_name(self.prefix, str(frame.get("task_name") or "task"), run_id),
            "jobQueue": self.job_queue,
            "jobDefinition": self.job_definition,
            "containerOverrides": overrides,
        }
        size, total = _json_size(overrides), _json_size(request)
        if size > MAX_OVERRIDES_CHARS or total > SUBMIT_JOB_LIMIT:
            limit = self.config.get("inline_payload_limit", type(self).inline_payload_limit)
            what = (
                f"container overrides of {size} characters (ECS refuses more than {ECS_OVERRIDES_LIMIT} when the "
                f"job starts; wove keeps {BATCH_RESERVE} for the variables AWS Batch adds)"
                if size > MAX_OVERRIDES_CHARS
                else f"a SubmitJob request of {total} bytes (AWS Batch takes at most {SUBMIT_JOB_LIMIT})"
            )
            raise ConfigError(
                f"environment {self.name!r}: run {run_id} would need {what}; lower "
                f"executor_config['inline_payload_limit'] (now {limit}) or shrink "
                "executor_config['container_overrides'] and executor_config['submit_options']"
            )
        return request

    def _connect(self) -> None:
        """In a worker thread: create the clients wove owns, then look the job queue up once."""
        if self.client is None:  # wove's own clients; a given client comes without a logs client unless one is given
            boto3: Any = importlib.import_module("boto3")  # typed as Any: boto3 ships no type hints
            session = boto3.session.Session()  # one per adapter: the default session is not thread-safe
            options = {**self.client_options}
            for key in ("region_name", "endpoint_url"):
                if self.config.get(key):
                    options[key] = self.config[key]
            self.client = session.client("batch", **options)
            self._owned.append(self.client)
            if self.logs is None and self.log_tail_lines:
                endpoint = self.config.get("logs_endpoint_url", options.get("endpoint_url"))
                self.logs = session.client("logs", **{**options, "endpoint_url": endpoint})
                self._owned.append(self.logs)
        try:
            queues = self.client.describe_job_queues(jobQueues=[self.job_queue]).get("jobQueues")
        except Exception as exc:
            if _error_code(exc) in _ACCESS_DENIED:  # SubmitJob may still be allowed; its errors name the queue
                logger.debug("environment %r: may not describe job queues: %r", self.name, exc)
                return
            raise
        if not queues:
            raise ConfigError(
                f"environment {self.name!r}: AWS Batch has no job queue {self.job_queue!r} in region "
                f"{self.client.meta.region_name}; fix executor_config['job_queue'] or 'region_name'"
            )

    def run_ended(self, run_id: str) -> None:
        """The run has its outcome: stop watching its job (and never fetch a log tail for it)."""
        item = self._by_run.pop(run_id, None)
        if item is not None:
            job_id, watched = item
            watched.ended = True
            if self._watched.get(job_id) is watched:
                del self._watched[job_id]

    # -- watching ---------------------------------------------------------------------------------------------

    def _watch(self, submission: AwsBatchSubmission, frame: Frame) -> None:
        if self._closed:
            return
        watched = _Watched(str(frame["run_id"]), frame.get("task_id"), submission.job_name)
        self._watched[submission.job_id] = watched
        self._by_run[watched.run_id] = (submission.job_id, watched)
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        """DescribeJobs for the watched jobs every ``poll_interval``, until none is left; report the ended ones."""
        failing = False
        try:
            while self._watched:
                await asyncio.sleep(self.poll_interval)
                job_ids = list(self._watched)
                for start in range(0, len(job_ids), DESCRIBE_BATCH):
                    chunk = job_ids[start : start + DESCRIBE_BATCH]
                    try:
                        jobs = await self.run_blocking(self._describe, chunk)
                    except Exception as exc:  # throttled, or the network hiccupped: the next round tries again
                        log = logger.debug if failing else logger.warning
                        log("environment %r: DescribeJobs failed: %s: %s", self.name, type(exc).__name__, exc)
                        failing = True
                        continue
                    failing = False
                    self._review(chunk, jobs)
        finally:
            self._poller = None

    def _describe(self, job_ids: list[str]) -> dict[str, Mapping[str, Any]]:
        jobs = self.client.describe_jobs(jobs=job_ids).get("jobs") or []
        return {str(job.get("jobId")): job for job in jobs}

    def _review(self, job_ids: list[str], jobs: Mapping[str, Mapping[str, Any]]) -> None:
        now = time.monotonic()
        for job_id in job_ids:
            watched = self._watched.get(job_id)
            if watched is None:
                continue  # cancelled meanwhile
            job = jobs.get(job_id)
            if job is None:
                watched.missing_since = watched.missing_since or now
                if now - watched.missing_since >= VANISH_AFTER:
                    del self._watched[job_id]
                    message = f"AWS Batch job {watched.job_name} ({job_id}) is no longer known to DescribeJobs"
                    self._lost(watched, message, kind="JobVanished")
                continue
            watched.missing_since = None
            if job.get("status") in ("SUCCEEDED", "FAILED"):
                del self._watched[job_id]
                report = asyncio.get_running_loop().create_task(self._report(watched, job_end(job)))
                self._reports.add(report)
                report.add_done_callback(self._reports.discard)

    async def _report(self, watched: _Watched, end: JobEnd) -> None:
        """End a run whose job ended; dropped by the executor when the worker's outcome came first."""
        if end.ran or end.status == "SUCCEEDED":
            await asyncio.sleep(self.finish_grace)  # the worker posted before it exited: let that outcome land
        if watched.ended:
            return
        if end.status == "SUCCEEDED":
            message = end.describe("but wove's worker reported no outcome")
            self._lost(watched, message, kind="JobFinishedWithoutResult")
            return
        message = end.describe("before wove's worker reported an outcome")
        if end.ran and end.log_stream:
            tail = await self._log_tail(end.log_group or self.log_group or DEFAULT_LOG_GROUP, end.log_stream)
            if tail:
                message += f"\n--- last lines of its log ---\n{tail}"
        self._lost(watched, message, kind="JobFailed")

    async def _log_tail(self, group: str, stream: str) -> str:
        if self.logs is None or not self.log_tail_lines:
            return ""
        try:
            response = await asyncio.wait_for(
                self.run_blocking(
                    self.logs.get_log_events,
                    logGroupName=group,
                    logStreamName=stream,
                    limit=self.log_tail_lines,
                    startFromHead=False,
                ),
                LOG_TIMEOUT,
            )
        except Exception as exc:
            logger.info("environment %r: could not read log stream %s/%s: %r", self.name, group, stream, exc)
            return ""
        lines = [str(event.get("message", "")).rstrip()[:1000] for event in response.get("events") or ()]
        return "\n".join(lines[-self.log_tail_lines :])

    def _lost(self, watched: _Watched, message: str, *, kind: str) -> None:
        self._by_run.pop(watched.run_id, None)
        logger.debug("environment %r: run %s: %s", self.name, watched.run_id, message.splitlines()[0])
        self.report_lost({"run_id": watched.run_id, "task_id": watched.task_id}, message, kind=kind)


# -- configuration ---------------------------------------------------------------------------------------------


def _required(config: Mapping[str, Any], key: str) -> str:
    value = config.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"the aws_batch executor needs executor_config[{key!r}] (a name or ARN), got {value!r}")
    return value


def _optional_text(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"executor_config[{key!r}] must be a non-empty string, got {value!r}")
    return value


def _prefix(value: Any) -> str:
    if not isinstance(value, str) or (value and not _NAME_VALID.fullmatch(value)) or len(value) > MAX_PREFIX:
        raise ConfigError(
            "executor_config['job_name_prefix'] must be empty or start with a letter or digit and hold only letters,"
            f" digits, '-' and '_' (at most {MAX_PREFIX}), got {value!r}"
        )
    return value


def _python(value: Any) -> list[str]:
    command = [value] if isinstance(value, str) else value
    if not isinstance(command, (list, tuple)) or not command or not all(isinstance(p, str) and p for p in command):
        raise ConfigError(
            "executor_config['python'] must be the interpreter on the job's image, as a string ('python3') or a list"
            f" of strings (['/opt/venv/bin/python', '-X', 'utf8']), got {value!r}"
        )
    return list(command)


def _mapping(config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = config.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"executor_config[{key!r}] must be a dict, got {value!r}")
    return value


def _overrides(value: Any) -> dict[str, Any]:
    overrides = dict(_mapping({"container_overrides": value}, "container_overrides"))
    if "command" in overrides:
        raise ConfigError(
            "executor_config['container_overrides'] may not set 'command': wove runs its worker; set "
            "executor_config['python'] for the interpreter"
        )
    environment = overrides.get("environment", ())
    if isinstance(environment, Mapping):
        environment = [{"name": str(name), "value": str(value)} for name, value in environment.items()]
    valid = isinstance(environment, (list, tuple)) and all(
        isinstance(item, Mapping) and isinstance(item.get("name"), str) and isinstance(item.get("value"), str)
        for item in environment
    )
    if not valid:
        raise ConfigError(
            "executor_config['container_overrides']['environment'] must be a dict of strings or a list of "
            f"{{'name': ..., 'value': ...}} dicts, got {environment!r}"
        )
    if any(item["name"] == PAYLOAD_ENV for item in environment):
        raise ConfigError(f"executor_config['container_overrides'] may not set {PAYLOAD_ENV}: wove sets it")
    if environment:
        overrides["environment"] = [dict(item) for item in environment]
    return overrides


def _submit_options(value: Any) -> dict[str, Any]:
    options = dict(_mapping({"submit_options": value}, "submit_options"))
    for key, instead in RESERVED_SUBMIT_OPTIONS.items():
        if key in options:
            raise ConfigError(f"executor_config['submit_options'] may not set {key!r}; use {instead}")
    return options


def _seconds(config: Mapping[str, Any], key: str, default: float, *, positive: bool = False) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigError(f"executor_config[{key!r}] must be seconds {bound}, got {value!r}")
    return float(value)


def _count(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"executor_config[{key!r}] must be an integer >= 0, got {value!r}")
    return value


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str))


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    error = response.get("Error") if isinstance(response, Mapping) else None
    return str(error.get("Code", "")) if isinstance(error, Mapping) else ""
