"""Helpers for the Celery and RQ integration tests: worker process groups, files tasks write, an executor driver."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from tests.services.base import ManagedProcess
from wove._types import TERMINAL_EVENTS, Frame
from wove.environment.remote import BackendAdapterEnvironmentExecutor

#: The repository root: workers run there with it on ``PYTHONPATH``, so they import ``tests.integration.*`` tasks.
ROOT = Path(__file__).resolve().parents[2]


def worker_env(**extra: str) -> dict[str, str]:
    return {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **extra}


def stop_group(worker: ManagedProcess, timeout: float = 10.0) -> None:
    """Stop a worker started in its own session: SIGTERM to its main process, then SIGKILL to the whole group."""
    if worker.alive():
        worker.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker.pid, signal.SIGKILL)  # pool children or a work horse left behind
    if worker.alive():
        worker.process.wait(timeout)
    worker.stop()


def kill_group(worker: ManagedProcess) -> None:
    """SIGKILL a worker and every process it started, as a lost machine or an OOM kill of the container would."""
    os.killpg(worker.pid, signal.SIGKILL)
    worker.process.wait(10)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout}s")
        time.sleep(0.02)


async def await_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout}s")
        await asyncio.sleep(0.02)


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.strip() else None


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


class Driver:
    """Drives a ``BackendAdapterEnvironmentExecutor`` as the runtime does and keeps every frame it returns."""

    def __init__(self, executor: BackendAdapterEnvironmentExecutor) -> None:
        self.executor = executor
        self.frames: dict[str, list[Frame]] = {}
        self._done: dict[str, asyncio.Event] = {}
        self._receiver = asyncio.get_running_loop().create_task(self._receive())

    @classmethod
    async def start(cls, adapter_class: Any, executor_name: str, config: dict[str, Any]) -> Driver:
        executor = BackendAdapterEnvironmentExecutor("jobs", adapter_class)
        environment = {"executor": executor_name, "executor_config": config}
        await executor.start(environment_name="jobs", environment_config=environment, run_config={})
        return cls(executor)

    async def _receive(self) -> None:
        while True:
            frame = await self.executor.recv()
            self.frames.setdefault(frame["run_id"], []).append(frame)
            if frame["type"] in TERMINAL_EVENTS:
                self._event(frame["run_id"]).set()

    def _event(self, run_id: str) -> asyncio.Event:
        return self._done.setdefault(run_id, asyncio.Event())

    async def submit(self, func: Any, *, delivery: dict[str, Any] | None = None, **args: Any) -> str:
        run_id = uuid.uuid4().hex
        self._event(run_id)
        frame = {
            "type": "run_task",
            "run_id": run_id,
            "task_id": f"task-{run_id[:6]}",
            "task_name": func.__name__,
            "callable": func,
            "args": args,
            "delivery": delivery or {},
        }
        await self.executor.send(frame)
        return run_id

    async def outcome(self, run_id: str, timeout: float = 20.0) -> Frame:
        await asyncio.wait_for(self._event(run_id).wait(), timeout)
        return self.frames[run_id][-1]

    def kinds(self, run_id: str) -> list[str]:
        return [frame["type"] for frame in self.frames.get(run_id, [])]

    async def close(self) -> None:
        self._receiver.cancel()
        await asyncio.gather(self._receiver, return_exceptions=True)
        await self.executor.stop()
