"""``TaskiqAdapter``: runs wove tasks as Taskiq tasks on existing Taskiq workers.

Each payload is kicked as the task ``wove.integrations.taskiq_worker`` registers (``"wove.run"``), with the wove run
id as Taskiq task id. Results come back over the callback server, so Taskiq's result backend is never polled and
latency follows the broker's dispatch latency. Start a worker that runs wove tasks with::

    taskiq worker wove.integrations.taskiq_worker:broker

Config keys (``executor_config``): ``broker`` (a Taskiq broker, or a callable returning one), ``broker_url`` (builds a
taskiq-redis ``ListQueueBroker``; default ``$WOVE_TASKIQ_BROKER_URL`` or localhost), ``queue_name`` (the list a built
broker pushes to, default ``"wove"``; for a given broker, sent as the ``queue_name`` label), ``task_name`` (default
``"wove.run"``), ``labels`` (Taskiq labels for every kick, e.g. ``{"timeout": 600}``) and ``cancel_channel``.

Taskiq cannot cancel a running task. When the broker is a taskiq-redis one, ``cancel`` publishes the run id on a
Redis channel (``cancel_channel``, default ``"wove:taskiq:cancel"``) that the worker side listens to; the worker
cancels that run's coroutine. Otherwise the job runs on and its late frames are ignored.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from wove._types import Frame
from wove.errors import BackendUnavailableError, ConfigError, SubmitError, WoveError
from wove.integrations._redis_loops import loop_hint, opened_in_another_loop
from wove.integrations.base import BackendAdapter, check_modules

__all__ = [
    "BROKER_URL_ENV",
    "CANCEL_CHANNEL",
    "DEFAULT_QUEUE",
    "TASK_NAME",
    "TaskiqAdapter",
    "TaskiqTask",
]

logger = logging.getLogger("wove.integrations.taskiq")

#: Name the wove task is registered under on Taskiq brokers.
TASK_NAME = "wove.run"
#: Redis list the built broker and the shipped worker use unless configured: not Taskiq's default ``"taskiq"``, so a
#: wove worker never takes (and drops, as an unknown task) messages meant for the application's own workers.
DEFAULT_QUEUE = "wove"
#: Redis pub/sub channel carrying the run ids of cancelled runs to workers.
CANCEL_CHANNEL = "wove:taskiq:cancel"
#: Environment variable both sides read for the broker URL when nothing else is configured.
BROKER_URL_ENV = "WOVE_TASKIQ_BROKER_URL"
DEFAULT_BROKER_URL = "redis://localhost:6379/0"


@dataclass(frozen=True)
class TaskiqTask:
    """Identifies one kicked task (its Taskiq task id is the wove run id)."""

    task_id: str
    task_name: str

    def __str__(self) -> str:
        return f"taskiq task {self.task_name} {self.task_id}"


class TaskiqAdapter(BackendAdapter):
    """Kicks payloads as the Taskiq task ``task_name`` and cancels them over a Redis channel when it can."""

    backend: ClassVar[str] = "taskiq"
    required_modules: ClassVar[tuple[str, ...]] = ("taskiq",)
    install_hint: ClassVar[str] = "pip install 'wove[taskiq]'"
    #: A kick is one JSON message pushed onto a Redis list (or a stream, or an AMQP queue); bodies above 32 KiB are
    #: fetched from the callback server instead, so messages stay small for every broker.
    inline_payload_limit: ClassVar[int | None] = 32 * 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.task_name = _text(self.config, "task_name") or TASK_NAME
        self.queue_name = _text(self.config, "queue_name")
        self.cancel_channel = _text(self.config, "cancel_channel") or CANCEL_CHANNEL
        self.labels = _labels(self.config.get("labels"))
        if self.queue_name is not None:  # taskiq-redis brokers push to the list this label names
            self.labels.setdefault("queue_name", self.queue_name)
        self.broker: Any = None
        self._owns_broker = False
        self._started = False
        self._redis: Any = None

    # -- adapter contract ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Get the broker once for the environment; start it when wove made it, and check Redis answers."""
        try:
            self.broker, self._owns_broker = await self._make_broker()
            if self._owns_broker:
                await self.broker.startup()
            pool = getattr(self.broker, "connection_pool", None)
            if pool is not None and not self._owns_broker and opened_in_another_loop(pool):
                hint = loop_hint("broker", "broker", "broker_url")
                raise BackendUnavailableError(f"environment {self.name!r} (taskiq): {hint}", environment=self.name)
            if pool is not None:  # a taskiq-redis broker: its Redis also carries cancellations
                from redis.asyncio import Redis

                self._redis = Redis(connection_pool=pool)
                await self._redis.ping()
            self._started = True
        except WoveError:
            raise
        except Exception as exc:
            await self.close()
            message = f"environment {self.name!r} (taskiq): broker unavailable: {type(exc).__name__}: {exc}{_hint(exc)}"
            raise BackendUnavailableError(message, environment=self.name) from exc
        if self._redis is None:
            logger.info(
                "environment %r: %s has no Redis connection pool; cancelled runs finish on their worker and their "
                "late frames are ignored",
                self.name,
                type(self.broker).__name__,
            )

    async def submit(self, payload: Frame, frame: Frame) -> TaskiqTask:
        """Kick one task whose Taskiq id is the run id; return once the broker accepted the message."""
        from taskiq.exceptions import SendTaskError
        from taskiq.kicker import AsyncKicker

        run_id = str(frame["run_id"])
        with self.translate_errors("submit", run_id=run_id):
            if self.broker is None:
                message = f"environment {self.name!r} (taskiq) is not connected"
                raise SubmitError(message, environment=self.name, run_id=run_id)
            kicker: AsyncKicker[Any, Any] = AsyncKicker(self.task_name, self.broker, dict(self.labels))
            try:
                task = await kicker.with_task_id(run_id).kiq(payload)
            except SendTaskError as exc:  # its message is generic; the broker's own error says what went wrong
                cause = exc.__cause__ or exc
                if not _hint(cause):
                    raise cause from None
                self._started = False  # the broker's connections are not wove's to close
                message = f"environment {self.name!r} (taskiq): submit failed: {cause}{_hint(cause)}"
                raise SubmitError(message, environment=self.name, run_id=run_id) from cause
        return TaskiqTask(str(task.task_id), self.task_name)

    async def cancel(self, run_id: str, submission: Any, frame: Frame) -> None:
        """Publish the run id to the workers' cancel listeners; the one running it cancels it."""
        if self._redis is None:
            return
        with self.translate_errors("cancel", run_id=run_id):
            listeners = await self._redis.publish(self.cancel_channel, run_id)
        logger.debug("environment %r: cancel of run %s sent to %s listener(s)", self.name, run_id, listeners)

    async def close(self) -> None:
        """Shut down the broker wove made. Of a broker passed in, close only the Redis connections wove opened (they
        belong to its runtime loop, which stops); the broker is not shut down and reconnects when next used."""
        redis, self._redis = self._redis, None
        broker, self.broker = self.broker, None
        if redis is not None:
            await redis.aclose()  # a client over the broker's pool: closing it leaves the pool alone
        if broker is None:
            return
        if self._owns_broker:
            await broker.shutdown()
        elif self._started and getattr(broker, "connection_pool", None) is not None:
            try:
                await broker.connection_pool.disconnect()
            except Exception as exc:  # the pool may hold connections opened elsewhere meanwhile
                logger.debug("environment %r: closing the given broker's connections failed: %r", self.name, exc)

    # -- broker ----------------------------------------------------------------------------------------------

    async def _make_broker(self) -> tuple[Any, bool]:
        given = self.config.get("broker")
        if given is not None:
            if hasattr(given, "kick"):
                return given, False
            if not callable(given):
                raise ConfigError(
                    f"executor_config['broker'] must be a Taskiq broker or a callable returning one: {given!r}"
                )
            made = given()
            return (await made if inspect.isawaitable(made) else made), True
        check_modules(("taskiq_redis",), self.install_hint, what=f"environment {self.name!r} (broker_url)")
        from taskiq_redis import ListQueueBroker

        url = _text(self.config, "broker_url") or os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL
        return ListQueueBroker(url, queue_name=self.queue_name or DEFAULT_QUEUE), True


def _hint(exc: BaseException) -> str:
    """What to do about a broker whose connections belong to another event loop (empty for any other error)."""
    return "; " + loop_hint("broker", "broker", "broker_url") if "different loop" in str(exc) else ""


def _labels(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise ConfigError(f"executor_config['labels'] must be a dict with string keys, got {value!r}")
    return dict(value)


def _text(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"executor_config[{key!r}] must be a non-empty string, got {value!r}")
    return value
