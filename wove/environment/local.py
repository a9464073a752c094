"""The ``local`` executor: runs tasks in this process and speaks the same frames as a remote one.

Async callables run on the runtime's event loop; sync callables run in a thread pool of ``max_workers``.
Tasks of the weave's default environment skip this executor and run inline in the weave's own loop;
this executor serves every other environment whose executor is ``local``.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import time
import traceback
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

from wove._types import Frame
from wove.environment.base import EnvironmentExecutor


def error_info(exc: BaseException, source: str) -> dict[str, Any]:
    """The normalized error dict carried by ``task_error`` frames."""
    return {
        "kind": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "retryable": not isinstance(exc, (TypeError, SyntaxError)),
        "source": source,
    }


class LocalEnvironmentExecutor(EnvironmentExecutor):
    """Runs ``run_task`` frames in-process; ``cancel_task`` cancels the asyncio task running them."""

    def __init__(self) -> None:
        self._events: asyncio.Queue[Frame] | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._host = socket.gethostname()
        self._pid = os.getpid()

    async def start(
        self,
        *,
        environment_name: str,
        environment_config: Mapping[str, Any],
        run_config: Mapping[str, Any],
    ) -> None:
        if self._events is not None:
            return
        self._events = asyncio.Queue()
        max_workers = environment_config.get("max_workers")
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"wove-{environment_name}")

    def _emit(self, frame: Frame) -> None:
        assert self._events is not None, "start() must be awaited before frames flow"
        self._events.put_nowait(frame)

    async def send(self, frame: Frame) -> None:
        if self._events is None:
            raise RuntimeError("LocalEnvironmentExecutor.send() called before start()")
        kind = frame.get("type")
        if kind == "run_task":
            task = asyncio.get_running_loop().create_task(self._run(frame))
            self._running[frame["run_id"]] = task
            task.add_done_callback(partial(self._forget, frame["run_id"]))
        elif kind == "cancel_task":
            running = self._running.get(frame.get("run_id", ""))
            if running is not None:
                running.cancel()
        elif kind == "shutdown":
            for task in list(self._running.values()):
                task.cancel()

    def _forget(self, run_id: str, _task: object) -> None:
        self._running.pop(run_id, None)

    async def _run(self, frame: Frame) -> None:
        ids = {"run_id": frame["run_id"], "task_id": frame.get("task_id")}
        self._emit({"type": "task_started", **ids, "host": self._host, "pid": self._pid, "at": time.time()})
        func = frame["callable"]
        args = frame.get("args") or {}
        try:
            if inspect.iscoroutinefunction(func):
                result = await func(**args)
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(self._pool, partial(func, **args))
        except asyncio.CancelledError:
            self._emit({"type": "task_cancelled", **ids, "at": time.time()})
            return
        except Exception as exc:
            self._emit(
                {"type": "task_error", **ids, "exception": exc, "error": error_info(exc, "task"), "at": time.time()}
            )
            return
        self._emit({"type": "task_result", **ids, "result": result, "at": time.time()})

    async def recv(self) -> Frame:
        if self._events is None:
            raise RuntimeError("LocalEnvironmentExecutor.recv() called before start()")
        return await self._events.get()

    async def stop(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
