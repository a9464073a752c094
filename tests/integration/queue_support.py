"""Helpers for the task-system integration tests: worker processes, waits, files tasks write, an executor driver.

Imports no engine SDK (ARQ's tests run in an environment of their own that has only wove's ``dev`` and ``arq``
extras).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

from tests.services.base import ManagedProcess, wait_until
from wove._types import TERMINAL_EVENTS, Frame
from wove.environment.remote import BackendAdapterEnvironmentExecutor

#: The repository root: workers run there with it on ``PYTHONPATH``, so they import ``tests.integration.*`` tasks.
ROOT = Path(__file__).resolve().parents[2]


def require_sdk(*modules: str, venv_hint: str) -> None:
    """Skip the module when an SDK is missing, except in CI (``CI=true``), where the import error fails the run."""
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            if os.environ.get("CI"):
                raise
            pytest.skip(f"{module} is not installed; {venv_hint}", allow_module_level=True)


def python_command(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def worker_env(**extra: str) -> dict[str, str]:
    """What a worker started from the repository root needs to import ``tests.*`` task functions."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", **extra}


def stop_group(worker: ManagedProcess, timeout: float = 10.0) -> None:
    """Stop a worker started in its own session: SIGTERM to its main process, then SIGKILL to the whole group."""
    end_group(worker, timeout)
    worker.stop()


def end_group(worker: ManagedProcess, timeout: float = 10.0) -> None:
    """SIGTERM to a worker's main process; once it is gone (or after ``timeout``), SIGKILL to its whole group."""
    if worker.alive():
        worker.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.process.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker.pid, signal.SIGKILL)  # pool children or a work horse left behind
    if worker.alive():
        worker.process.wait(timeout)


def kill_group(worker: ManagedProcess) -> None:
    """SIGKILL a worker and every process it started, as a lost machine or an OOM kill of the container would."""
    os.killpg(worker.pid, signal.SIGKILL)
    worker.process.wait(10)


class WorkerProcess(ManagedProcess):
    """A task-system worker started in its own session from the repository root, so it imports ``tests.*`` tasks."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        super().__init__(args, log, env=worker_env(**(env or {})), cwd=ROOT)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to the main process, then SIGKILL to whatever is left of its group (pool children, work horses)."""
        end_group(self, timeout)
        super().stop(timeout)

    def children(self) -> set[int]:
        return {child.pid for child in psutil.Process(self.pid).children()}


def start_worker(args: Sequence[str], log: Path, env: dict[str, str] | None, ready: str, what: str) -> WorkerProcess:
    """A worker, returned once its log shows ``ready``; stopped again if it dies or never gets there."""
    worker = WorkerProcess(args, log, env)
    try:
        wait_until(lambda: ready in worker.output() or not worker.alive(), 60, what, log)
        assert worker.alive(), worker.output()
    except BaseException:
        worker.stop()
        raise
    return worker


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout}s")
        time.sleep(0.02)


async def await_for(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout}s")
        await asyncio.sleep(0.02)


async def wait_for_file(path: Path, timeout: float = 20.0) -> str:
    """The contents of ``path`` once a worker has written it."""
    await await_for(path.exists, timeout, f"{path.name} was written")
    await asyncio.sleep(0.01)  # the writer may still be flushing
    return path.read_text()


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return int(text) if text.strip() else None


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def run_doc_example(
    doc: Path, marker: str, env: dict[str, str], cwd: Path, *, append: str = "", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the ```python block of ``doc`` containing ``marker`` (plus ``append``) as a script; it must succeed."""
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    script = cwd / "example.py"
    script.write_text(next(block for block in blocks if marker in block) + append)
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return done


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
