"""``RQAdapter``: runs selected tasks on RQ (Redis Queue) workers.

Each payload becomes one RQ job calling :func:`wove.integrations.rq_worker.run_payload`, enqueued by its dotted path
(the submitting process never imports the worker module) with the run id as the job id. RQ's own options pass
through ``enqueue_options`` (``job_timeout``, ``result_ttl``, ``failure_ttl``, ``ttl``, ``at_front``, ...); RQ's
``job_timeout`` (default 180 s) still applies, and a run that outlives it is cancelled by RQ. Runs submitted
together (a mapped task) are enqueued in one Redis pipeline (``Queue.enqueue_many``) when every option allows it.

Cancelling cancels a queued job (it never runs) and sends RQ's stop-job command for a started one: the default
forking ``Worker`` kills the work horse running it. A ``SimpleWorker`` runs jobs in its own process and cannot stop
one that started; that run finishes on the worker and its late frames are ignored.

While runs are out, the adapter reads their jobs' RQ status every ``watch_interval`` seconds (one pipelined round
trip). A job RQ failed before wove's code could report (a work horse killed by the OOM killer, a worker without
wove installed) ends its run with ``DeliveryLostError`` at once; a job stopped or cancelled from RQ's side ends it with
``RunCancelledError``. Without that, such runs would wait for ``delivery_heartbeat_seconds`` or forever.

Config keys (``executor_config``): ``queue`` (an existing ``rq.Queue``), or ``connection`` (an existing
``redis.Redis``) or ``redis_url`` with ``queue_name``; ``enqueue_options``; ``watch_interval``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, ClassVar

from wove._types import Frame
from wove.errors import BackendUnavailableError, ConfigError, SubmitError, WoveError
from wove.integrations._batching import BatchSubmitter
from wove.integrations.base import BackendAdapter

__all__ = ["DEFAULT_QUEUE", "WORKER_FUNCTION", "RQAdapter"]

logger = logging.getLogger("wove.integrations.rq")

#: The function RQ workers call with each payload, by the dotted path RQ imports.
WORKER_FUNCTION = "wove.integrations.rq_worker.run_payload"
#: Queue name used unless ``queue`` or ``queue_name`` says otherwise.
DEFAULT_QUEUE = "wove"
#: Where ``redis_url`` points unless it is given, as RQ's own command line assumes.
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
#: Keys ``enqueue_options`` may not hold: the adapter sets them for every payload.
RESERVED_OPTIONS = frozenset({"func", "args", "kwargs", "job_id", "pipeline"})
#: Seconds between status reads of the jobs of unfinished runs; ``executor_config["watch_interval"]``, 0 disables.
DEFAULT_WATCH_INTERVAL = 1.0
#: RQ statuses after which a job will never run wove's code again.
_FAILED, _ENDED_BY_RQ, _DONE = {b"failed"}, {b"stopped", b"canceled"}, {b"finished"}


class RQAdapter(BackendAdapter):
    """Enqueues payloads as RQ jobs; cancels queued jobs and stops started ones."""

    backend: ClassVar[str] = "rq"
    required_modules: ClassVar[tuple[str, ...]] = ("rq", "redis")
    install_hint: ClassVar[str] = "pip install 'wove[rq]'"
    #: RQ pickles each job's arguments into a Redis hash that stays in memory for the job's lifetime (and its
    #: ``result_ttl``/``failure_ttl`` after). Bodies above 32 KiB stay on the callback server instead.
    inline_payload_limit: ClassVar[int | None] = 32 * 1024
    #: The dotted path of the function jobs call (a subclass may point at a wrapper of its own).
    worker_function: ClassVar[str] = WORKER_FUNCTION

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = self.config
        options = dict(config.get("enqueue_options") or {})
        if "timeout" in options and "job_timeout" in options:
            raise ConfigError("executor_config['enqueue_options'] sets both 'timeout' and 'job_timeout'")
        if "job_timeout" in options:  # what ``Queue.enqueue`` calls it; ``enqueue_call`` says ``timeout``
            options["timeout"] = options.pop("job_timeout")
        reserved = sorted(RESERVED_OPTIONS.intersection(options))
        if reserved:
            raise ConfigError(f"executor_config['enqueue_options'] may not set {', '.join(reserved)}")
        self.enqueue_options = options
        self.queue: Any = config.get("queue")
        if self.queue is not None and not callable(getattr(self.queue, "enqueue_call", None)):
            raise ConfigError(f"executor_config['queue'] must be an rq.Queue, got {self.queue!r}")
        self._given_queue = self.queue is not None
        self._given_connection = config.get("connection") is not None
        self.queue_name = str(self.queue.name) if self.queue is not None else _text(config, "queue_name")
        self.watch_interval = _seconds(config.get("watch_interval", DEFAULT_WATCH_INTERVAL))
        self._watched: dict[str, Frame] = {}  # run id -> the ids a frame about it needs
        self._watcher: asyncio.Task[None] | None = None
        self._enqueuer: BatchSubmitter[tuple[Frame, Frame], str] = BatchSubmitter(self._enqueue_many)
        self._pipelined = False  # whether batches go through Queue.enqueue_many (set by _check)
        self._closed = False

    # -- adapter contract ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Import RQ, build the queue (unless one was given) and check Redis answers, off the event loop."""
        with self._unavailable("start"):
            if self.queue is None:
                self.queue = await self.run_blocking(_create_queue, self.config, self.queue_name)
            await self.run_blocking(self._check)

    async def submit(self, payload: Frame, frame: Frame) -> str:
        """Enqueue one job calling ``worker_function`` with ``payload``; the run id is the job id."""
        run_id = str(frame["run_id"])
        if self._closed:
            raise SubmitError("the rq adapter is closed", environment=self.name, run_id=run_id)
        with self.translate_errors("enqueue", run_id=run_id):
            job_id = await self._enqueuer.submit((payload, frame))
        self._watch(run_id, frame)
        return job_id

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """Cancel the job if it waits; ask its worker to stop it if it started."""
        self._watched.pop(run_id, None)
        with self.translate_errors("cancel", run_id=run_id):
            outcome = await self.run_blocking(self._cancel, str(submission or run_id))
        logger.debug("environment %r: cancel of rq job %s: %s", self.name, run_id, outcome)

    async def close(self) -> None:
        """Disconnect the Redis connection pool the adapter created; a given queue or connection stays open."""
        if self._closed:
            return
        self._closed = True
        self._watched.clear()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self.queue is not None and not self._given_queue and not self._given_connection:
            try:
                await self.run_blocking(self.queue.connection.close)
            except Exception:
                logger.warning("environment %r: closing the redis connection failed", self.name, exc_info=True)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _check(self) -> None:
        """Ping Redis, so a wrong URL fails once here rather than in every run, and check ``enqueue_options``."""
        self.queue.connection.ping()
        accepted = inspect.signature(self.queue.enqueue_call).parameters
        unknown = sorted(set(self.enqueue_options) - set(accepted))
        if unknown:
            raise ConfigError(f"executor_config['enqueue_options'] has options RQ does not know: {', '.join(unknown)}")
        prepare = getattr(type(self.queue), "prepare_data", None)
        if callable(getattr(self.queue, "enqueue_many", None)) and callable(prepare):
            self._pipelined = set(self.enqueue_options) <= set(inspect.signature(prepare).parameters)

    def _enqueue_many(self, batch: Sequence[tuple[Frame, Frame]]) -> list[str | BaseException]:
        """Enqueue a batch in a worker thread: one thread hop per batch, not per run.

        Several jobs go in one Redis pipeline (``Queue.enqueue_many``): one round trip for the batch instead of a
        few per job, each of which would give up the GIL to the weave's threads and wait to get it back. A failed
        pipeline fails every run of its batch.
        """
        if self._pipelined and len(batch) > 1:
            datas = [
                self.queue.prepare_data(self.worker_function, args=(payload,), **self._options(frame))
                for payload, frame in batch
            ]
            try:
                return [str(job.id) for job in self.queue.enqueue_many(datas)]
            except Exception as exc:
                return [exc] * len(batch)
        enqueued: list[str | BaseException] = []
        for payload, frame in batch:
            try:
                job = self.queue.enqueue_call(self.worker_function, args=(payload,), **self._options(frame))
                enqueued.append(str(job.id))
            except Exception as exc:
                enqueued.append(exc)
        return enqueued

    def _options(self, frame: Frame) -> dict[str, Any]:
        """The job's id (the run id), its description and the user's ``enqueue_options``."""
        run_id = str(frame["run_id"])
        description = f"wove task {frame.get('task_name')!r} run {run_id}"
        return {"description": description, **self.enqueue_options, "job_id": run_id}

    def _watch(self, run_id: str, frame: Frame) -> None:
        if not self.watch_interval or self._closed:
            return
        self._watched[run_id] = {"run_id": run_id, "task_id": frame.get("task_id")}
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        """Read the status of every watched job each interval until none is left; report what RQ ended."""
        try:
            while self._watched:
                await asyncio.sleep(self.watch_interval)
                run_ids = list(self._watched)
                try:
                    statuses = await self.run_blocking(self._statuses, run_ids)
                except Exception as exc:  # Redis unreachable for a moment: the next round tries again
                    logger.warning("environment %r: could not read rq job statuses: %r", self.name, exc)
                    continue
                for run_id, status in zip(run_ids, statuses, strict=True):
                    if status is None or status in _DONE:
                        self._watched.pop(run_id, None)  # finished, or expired: its frames told the weave
                    elif status in _FAILED | _ENDED_BY_RQ:
                        ids = self._watched.pop(run_id, None)
                        if ids is not None:
                            await self._report(ids, status.decode())
        finally:
            self._watcher = None

    def _statuses(self, run_ids: list[str]) -> list[bytes | None]:
        from rq.job import Job

        with self.queue.connection.pipeline(transaction=False) as pipe:
            for run_id in run_ids:
                pipe.hget(Job.key_for(run_id), "status")
            return [status.encode() if isinstance(status, str) else status for status in pipe.execute()]

    async def _report(self, ids: Frame, status: str) -> None:
        """End a run whose job RQ ended; the executor drops this if the worker already reported an outcome."""
        run_id = str(ids["run_id"])
        if status != "failed":
            logger.info("environment %r: rq job %s was %s outside wove", self.name, run_id, status)
            self.emit({"type": "task_cancelled", "run_id": run_id, "task_id": ids.get("task_id"), "at": time.time()})
            return
        try:
            reason = await self.run_blocking(self._failure, run_id)
        except Exception as exc:
            reason = f"(its error could not be read: {type(exc).__name__})"
        self.report_lost(ids, f"RQ failed job {run_id}: {reason}", kind="JobFailed")

    def _failure(self, run_id: str) -> str:
        """The last line of the job's failure as RQ recorded it (e.g. a work horse killed by a signal)."""
        from rq.job import Job

        result = Job.fetch(run_id, connection=self.queue.connection, serializer=self.queue.serializer).latest_result()
        lines = str(getattr(result, "exc_string", "") or "").strip().splitlines()
        return lines[-1] if lines else "no error recorded"

    def _cancel(self, job_id: str) -> str:
        from rq.command import send_stop_job_command
        from rq.exceptions import InvalidJobOperation, NoSuchJobError
        from rq.job import Job, JobStatus

        connection = self.queue.connection
        try:
            job = Job.fetch(job_id, connection=connection, serializer=self.queue.serializer)
        except NoSuchJobError:
            return "no such job (finished and expired)"
        status = job.get_status(refresh=False)
        if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            with suppress(InvalidJobOperation):  # cancelled meanwhile
                job.cancel()
            status = job.get_status(refresh=True)  # a worker may have taken it meanwhile
            if status == JobStatus.CANCELED:
                return "cancelled while queued"
        if status == JobStatus.STARTED:
            try:
                send_stop_job_command(connection, job_id, serializer=self.queue.serializer)
            except (InvalidJobOperation, NoSuchJobError):
                return "finished before the stop command"
            return f"stop-job sent to worker {job.worker_name}"
        return f"nothing to do (job is {status})"

    @contextmanager
    def _unavailable(self, action: str) -> Iterator[None]:
        try:
            yield
        except WoveError:
            raise
        except Exception as exc:
            message = f"environment {self.name!r} (rq): {action} failed at {self._where()}: {type(exc).__name__}: {exc}"
            raise BackendUnavailableError(message, environment=self.name) from exc

    def _where(self) -> str:
        """The Redis server, without credentials, for messages."""
        try:
            kwargs = self.queue.connection.connection_pool.connection_kwargs
            return f"redis {kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
        except Exception:
            return "redis"


def _create_queue(config: Mapping[str, Any], name: str) -> Any:
    from rq import Queue

    connection = config.get("connection")
    if connection is None:
        from redis import Redis

        connection = Redis.from_url(str(config.get("redis_url") or DEFAULT_REDIS_URL))
    return Queue(name, connection=connection)


def _seconds(value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"executor_config['watch_interval'] must be seconds >= 0 (0 disables), got {value!r}")
    return float(value)


def _text(config: Mapping[str, Any], key: str) -> str:
    value = config.get(key, DEFAULT_QUEUE)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"executor_config[{key!r}] must be a non-empty string, got {value!r}")
    return value
