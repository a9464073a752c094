"""``ArqAdapter``: runs wove tasks as ARQ jobs on an existing ARQ worker fleet.

Each payload becomes one job of the function ``wove.integrations.arq_worker`` registers (``"wove.run"``), which runs
it through wove's async worker entrypoint; results come back over the callback server, never through ARQ's result
keys. Start a worker that runs only wove jobs with::

    arq wove.integrations.arq_worker.WorkerSettings

Config keys (``executor_config``): ``pool`` (an ``ArqRedis``, or a callable returning one), ``redis_settings`` (an
``arq.connections.RedisSettings``, a dict of its fields, or a ``redis://`` URL; default ``$WOVE_ARQ_REDIS_URL`` or
localhost), ``queue_name`` (default ``"arq:wove"``), ``function`` (default ``"wove.run"``), ``enqueue_options``
(passed to ``enqueue_job``: ``_defer_by``, ``_expires``, ...) and ``abort_timeout`` (seconds ``cancel`` waits for
the worker to confirm an abort; default 0).

A task's ``delivery_idempotency_key`` becomes the job id, so ARQ refuses a second job with the same key while the
first is queued, running, or its result is kept. Cancelling aborts the job (``Job.abort``); a worker stops a running
job only with ``allow_abort_jobs=True``, which the shipped ``WorkerSettings`` sets.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from wove._types import Frame
from wove.errors import BackendUnavailableError, ConfigError, SubmitError, WoveError
from wove.integrations._redis_loops import loop_hint, opened_in_another_loop
from wove.integrations.base import BackendAdapter

__all__ = ["DEFAULT_QUEUE", "FUNCTION_NAME", "REDIS_URL_ENV", "ArqAdapter", "ArqJob"]

logger = logging.getLogger("wove.integrations.arq")

#: Name the wove job function is registered under in ARQ workers.
FUNCTION_NAME = "wove.run"
#: Queue the adapter and the shipped worker use unless configured: not ARQ's default, so a wove worker never takes
#: (and fails, as "function not found") jobs meant for the application's own workers.
DEFAULT_QUEUE = "arq:wove"
#: Environment variable both sides read for the Redis URL when nothing else is configured.
REDIS_URL_ENV = "WOVE_ARQ_REDIS_URL"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
#: Enqueues in flight at once: each holds a Redis connection for its WATCH/MULTI, so a 500-item map would otherwise
#: open 500 connections at the same moment.
SUBMIT_CONCURRENCY = 32
#: Options wove sets itself, refused in ``enqueue_options``.
_RESERVED_OPTIONS = {
    "_job_id": "set delivery_idempotency_key to choose job ids",
    "_queue_name": "use the queue_name key",
}


@dataclass(frozen=True)
class ArqJob:
    """Identifies one enqueued job; ``ArqAdapter.cancel`` aborts it."""

    job_id: str
    queue_name: str

    def __str__(self) -> str:
        return f"arq job {self.job_id} on {self.queue_name}"


class ArqAdapter(BackendAdapter):
    """Enqueues payloads as ARQ jobs of ``function`` on ``queue_name``."""

    backend: ClassVar[str] = "arq"
    required_modules: ClassVar[tuple[str, ...]] = ("arq",)
    install_hint: ClassVar[str] = "pip install 'wove[arq]'"
    #: ARQ keeps each job's arguments in Redis twice: in the job and again in its result (an hour by default).
    #: Bodies above 16 KiB are fetched from the callback server instead.
    inline_payload_limit: ClassVar[int | None] = 16 * 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.queue_name = _text(self.config, "queue_name") or DEFAULT_QUEUE
        self.function = _text(self.config, "function") or FUNCTION_NAME
        self.enqueue_options = _enqueue_options(self.config.get("enqueue_options"))
        self.abort_timeout = _seconds(self.config, "abort_timeout", 0.0)
        self.pool: Any = None
        self._owns_pool = False
        self._started = False
        self._submitting = asyncio.Semaphore(SUBMIT_CONCURRENCY)

    # -- adapter contract ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Redis once for the environment (a given pool is pinged, a built one created)."""
        try:
            self.pool, self._owns_pool = await self._connect()
            if not self._owns_pool and opened_in_another_loop(self.pool.connection_pool):
                hint = loop_hint("pool", "pool", "redis_settings")
                raise BackendUnavailableError(f"environment {self.name!r} (arq): {hint}", environment=self.name)
            await self.pool.ping()
            self._started = True
        except WoveError:
            raise
        except Exception as exc:
            await self.close()
            message = f"environment {self.name!r} (arq): cannot reach Redis: {type(exc).__name__}: {exc}{_hint(exc)}"
            raise BackendUnavailableError(message, environment=self.name) from exc

    async def submit(self, payload: Frame, frame: Frame) -> ArqJob:
        """Enqueue one job; its id is the task's idempotency key when it has one."""
        run_id = str(frame["run_id"])
        options = dict(self.enqueue_options)
        key = (frame.get("delivery") or {}).get("idempotency_key")
        if key:
            options["_job_id"] = str(key)
        with self.translate_errors("submit", run_id=run_id):
            if self.pool is None:
                raise SubmitError(
                    f"environment {self.name!r} (arq) is not connected", environment=self.name, run_id=run_id
                )
            async with self._submitting:
                try:
                    job = await self.pool.enqueue_job(self.function, payload, _queue_name=self.queue_name, **options)
                except RuntimeError as exc:
                    if not _hint(exc):
                        raise
                    self._started = False  # the pool's connections are not wove's to close
                    message = f"environment {self.name!r} (arq): submit failed: {exc}{_hint(exc)}"
                    raise SubmitError(message, environment=self.name, run_id=run_id) from exc
        if job is None:
            raise SubmitError(
                f"environment {self.name!r} (arq): a job with id {key!r} is already queued, running, or finished "
                "with its result kept; the idempotency key stopped it from running twice",
                environment=self.name,
                run_id=run_id,
            )
        return ArqJob(str(job.job_id), self.queue_name)

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """Abort the job: a queued one never starts, a running one is cancelled by a worker allowing aborts."""
        if not isinstance(submission, ArqJob) or self.pool is None:
            return
        from arq.jobs import Job
        from redis.exceptions import RedisError

        job = Job(submission.job_id, self.pool, _queue_name=submission.queue_name)
        poll_delay = 0.02 if self.abort_timeout else 0.0
        with self.translate_errors("cancel", run_id=run_id):
            try:
                aborted = await job.abort(timeout=self.abort_timeout, poll_delay=poll_delay)
                outcome = "aborted" if aborted else "not aborted (it had finished or vanished)"
            except asyncio.TimeoutError:
                outcome = "abort requested"
            except (RedisError, OSError):
                raise
            except Exception as exc:  # abort() re-raises the outcome of a job that had already failed
                outcome = f"already finished ({type(exc).__name__})"
        logger.debug("environment %r: run %s, %s: %s", self.name, run_id, submission, outcome)

    async def close(self) -> None:
        """Close the pool wove created. Of a pool passed in, close only the connections wove opened (they belong to
        its runtime loop, which stops); the pool itself stays usable and reconnects when next used."""
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if self._owns_pool:
            closing = getattr(pool, "aclose", None) or pool.close
            await closing()
        elif self._started:
            try:
                await pool.connection_pool.disconnect()
            except Exception as exc:  # the pool may hold connections opened elsewhere meanwhile
                logger.debug("environment %r: closing the given pool's connections failed: %r", self.name, exc)

    # -- connection ------------------------------------------------------------------------------------------

    async def _connect(self) -> tuple[Any, bool]:
        given = self.config.get("pool")
        if given is not None:
            if hasattr(given, "enqueue_job"):
                return given, False
            if not callable(given):
                raise ConfigError(f"executor_config['pool'] must be an ArqRedis or a callable returning one: {given!r}")
            made = given()
            return (await made if inspect.isawaitable(made) else made), True
        from arq.connections import create_pool

        settings = _redis_settings(self.config.get("redis_settings"))
        return await create_pool(settings, default_queue_name=self.queue_name), True


def _hint(exc: BaseException) -> str:
    """What to do about a pool whose connections belong to another event loop (empty for any other error)."""
    return "; " + loop_hint("pool", "pool", "redis_settings") if "different loop" in str(exc) else ""


def _redis_settings(value: Any) -> Any:
    """An ``arq.connections.RedisSettings`` from a settings object, a dict of its fields, or a URL."""
    from arq.connections import RedisSettings

    if value is None:
        value = os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL
    if isinstance(value, RedisSettings):
        return value
    try:
        if isinstance(value, str):
            return RedisSettings.from_dsn(value)
        if isinstance(value, Mapping):
            return RedisSettings(**value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"executor_config['redis_settings'] is invalid: {exc}") from exc
    raise ConfigError(f"executor_config['redis_settings'] must be RedisSettings, a dict or a URL, got {value!r}")


def _enqueue_options(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"executor_config['enqueue_options'] must be a dict, got {value!r}")
    options = dict(value)
    for key in options:
        if not (isinstance(key, str) and key.startswith("_")):
            raise ConfigError(
                f"enqueue_options key {key!r}: enqueue_job passes keys without a leading underscore to the job "
                "function as arguments; ARQ's options are _defer_by, _defer_until, _expires, _job_try"
            )
        if key in _RESERVED_OPTIONS:
            raise ConfigError(f"enqueue_options key {key!r} is set by wove: {_RESERVED_OPTIONS[key]}")
    return options


def _text(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"executor_config[{key!r}] must be a non-empty string, got {value!r}")
    return value


def _seconds(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"executor_config[{key!r}] must be a number of seconds >= 0, got {value!r}")
    return float(value)
