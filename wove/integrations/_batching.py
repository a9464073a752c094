"""Getting blocking SDK calls off the runtime loop: batched submissions, and single calls that survive interpreter exit.

``BatchSubmitter``: an SDK whose submit call costs a few hundred microseconds of Python (Dask's ``Client.map``, Ray's
``.remote()``) would stall the weave's event loop if called on it, and one thread hop per run doubles that cost for a
mapped task. So submissions queue; while one batch is in the thread, the next one gathers everything that arrived
meanwhile. A lone run still goes at once, in a batch of one.

``call_blocking``: like ``BackendAdapter.run_blocking``, except that at interpreter exit (``wove.shutdown`` runs from
``atexit``, after every thread pool stopped taking work) it runs the call inline; ``close`` hooks use it so clients
are still released when a script simply ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

__all__ = ["BatchSubmitter", "call_blocking"]

logger = logging.getLogger("wove.integrations")

T = TypeVar("T")
R = TypeVar("R")


async def call_blocking(func: Callable[..., R], /, *args: Any, **kwargs: Any) -> R:
    """Run ``func`` in the loop's default thread pool; inline when that pool is shut down (interpreter exit)."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, func, *args, **kwargs)
    try:
        future = loop.run_in_executor(None, call)
    except RuntimeError:  # raised by the pool's submit, before anything ran: the interpreter is exiting
        logger.debug("thread pool shut down; running %s inline", getattr(func, "__name__", func))
        return func(*args, **kwargs)
    return await future


class BatchSubmitter(Generic[T, R]):
    """Calls ``submit_many(items)`` in a worker thread; it returns one result or exception per item, in order.

    Belongs to one event loop. An exception raised by ``submit_many`` itself fails every item of its batch.
    """

    def __init__(self, submit_many: Callable[[Sequence[T]], Sequence[R | BaseException]]) -> None:
        self._submit_many = submit_many
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Queue ``item``; return its result once its batch went through. Cancelling drops an item not yet sent."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, waiter))
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush())
        return await waiter

    async def _flush(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._queue:
                batch = [(item, waiter) for item, waiter in self._queue if not waiter.done()]
                self._queue = []
                if not batch:
                    continue
                try:
                    outcomes = await asyncio.to_thread(self._submit_many, [item for item, _ in batch])
                except Exception as exc:
                    outcomes = [exc] * len(batch)
                for (_, waiter), outcome in zip(batch, outcomes, strict=True):
                    if waiter.done():
                        continue  # its caller gave up while the batch was in the thread
                    if isinstance(outcome, BaseException):
                        waiter.set_exception(outcome)
                    else:
                        waiter.set_result(outcome)
                batch = []
        except BaseException as exc:
            for _, waiter in batch + self._queue:  # left over only when this task failed or was cancelled
                if waiter.done():
                    continue
                if isinstance(exc, asyncio.CancelledError):
                    waiter.cancel()
                else:
                    waiter.set_exception(exc)
            self._queue = []
            if isinstance(exc, asyncio.CancelledError):
                raise
            logger.exception("batch submission failed unexpectedly")
        finally:
            self._flusher = None
