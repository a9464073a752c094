"""The Taskiq worker side: the task wove kicks, a ready broker for it, and the listener that cancels runs.

Run a worker for wove's queue::

    WOVE_TASKIQ_BROKER_URL=redis://redis.internal:6379/0 taskiq worker wove.integrations.taskiq_worker:broker

``broker`` is a taskiq-redis ``ListQueueBroker`` built on first access from ``WOVE_TASKIQ_BROKER_URL`` (default
``redis://localhost:6379/0``) and ``WOVE_TASKIQ_QUEUE`` (default ``wove``), with the wove task registered. To run
wove tasks on your own broker instead, register them on it (the adapter's ``task_name`` must match)::

    from wove.integrations.taskiq_worker import register

    register(broker)

Cancellation: Taskiq has no way to stop a running task, so ``register`` adds a worker-startup hook that subscribes to
the adapter's Redis cancel channel (taskiq-redis brokers only). A cancelled run's coroutine is cancelled where it
awaits; a synchronous task function runs on in its thread until it returns, and its outcome is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from taskiq import AsyncBroker, TaskiqEvents, TaskiqState

from wove.integrations._async_worker import close_connections, run_payload
from wove.integrations.taskiq import BROKER_URL_ENV, CANCEL_CHANNEL, DEFAULT_BROKER_URL, DEFAULT_QUEUE, TASK_NAME

__all__ = ["CancelListener", "cancel_run", "register", "run"]  # and ``broker``, built on first access

logger = logging.getLogger("wove.integrations.taskiq")

#: Seconds between attempts to resubscribe after the cancel channel's connection failed.
RESUBSCRIBE_DELAY = 1.0
#: Cancelled run ids remembered when the cancel arrives before the run does (a message still queued).
REMEMBERED_CANCELS = 10_000

#: Runs in progress in this process, by run id.
_running: dict[str, asyncio.Task[None]] = {}
_cancelled: collections.OrderedDict[str, None] = collections.OrderedDict()


async def run(payload: Any) -> None:
    """The wove task: run one payload, unless its run was cancelled; ``payload`` is untyped so Taskiq skips parsing."""
    run_id = str(payload.get("run_id"))
    if run_id in _cancelled:
        del _cancelled[run_id]
        logger.info("run %s was cancelled before it started; skipped", run_id)
        raise asyncio.CancelledError
    inner = asyncio.ensure_future(run_payload(payload))
    _running[run_id] = inner
    try:
        await inner
    finally:
        _running.pop(run_id, None)


def cancel_run(run_id: str) -> bool:
    """Cancel this process's run ``run_id``; remember the id if it has not arrived yet. True if one was running."""
    task = _running.get(run_id)
    if task is None:
        _cancelled[run_id] = None
        while len(_cancelled) > REMEMBERED_CANCELS:
            _cancelled.popitem(last=False)
        return False
    logger.info("run %s cancelled by its weave", run_id)
    task.cancel()
    return True


class CancelListener:
    """Subscribes to the cancel channel on the broker's Redis for the life of a worker process."""

    def __init__(self, broker: AsyncBroker, channel: str) -> None:
        self.broker = broker
        self.channel = channel
        self._task: asyncio.Task[None] | None = None

    async def start(self, state: TaskiqState) -> None:
        pool = getattr(self.broker, "connection_pool", None)
        if pool is None:
            logger.warning("%s has no Redis connection pool: wove runs cannot be cancelled", type(self.broker).__name__)
            return
        subscribed = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._listen(pool, subscribed))
        await asyncio.wait({subscribed, self._task}, return_when=asyncio.FIRST_COMPLETED)

    async def stop(self, state: TaskiqState) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await close_connections()

    async def _listen(self, pool: Any, subscribed: asyncio.Future[None]) -> None:
        from redis.asyncio import Redis

        while True:
            try:
                client = Redis(connection_pool=pool)
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    if not subscribed.done():
                        subscribed.set_result(None)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message["data"]
                            cancel_run(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("cancel channel %r failed (%s); resubscribing", self.channel, exc)
                if not subscribed.done():
                    subscribed.set_result(None)
                await asyncio.sleep(RESUBSCRIBE_DELAY)


def register(broker: AsyncBroker, *, task_name: str = TASK_NAME, cancel_channel: str = CANCEL_CHANNEL) -> Any:
    """Register the wove task on ``broker`` and, in its worker processes, the cancel listener; returns the task."""
    listener = CancelListener(broker, cancel_channel)
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, listener.start)
    broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, listener.stop)
    return broker.register_task(run, task_name=task_name)


def _default_broker() -> AsyncBroker:
    from taskiq_redis import ListQueueBroker

    url = os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL
    made = ListQueueBroker(url, queue_name=os.environ.get("WOVE_TASKIQ_QUEUE") or DEFAULT_QUEUE)
    register(made, cancel_channel=os.environ.get("WOVE_TASKIQ_CANCEL_CHANNEL") or CANCEL_CHANNEL)
    return made


if TYPE_CHECKING:
    broker: AsyncBroker


def __getattr__(name: str) -> Any:
    if name != "broker":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with contextlib.suppress(KeyError):
        return globals()["_broker"]
    made = globals()["_broker"] = _default_broker()
    return made
