"""A test executor that follows a script per run: the public executor contract, driven by the test.

Not a mock of anything in wove: it is a custom executor, exactly what users may write, whose frames the
test chooses so the runtime's delivery policies can be exercised frame by frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from wove._types import Frame
from wove.environment.base import EnvironmentExecutor

Emit = Callable[[Any], None]
Script = Callable[[Frame, Emit], Awaitable[None]]


async def answer(frame: Frame, emit: Emit) -> None:
    """Default script: start, then return the callable's result."""
    emit({"type": "task_started", "run_id": frame["run_id"], "host": "scripted", "pid": 1})
    emit({"type": "task_result", "run_id": frame["run_id"], "result": frame["callable"](**frame["args"])})


class ScriptedExecutor(EnvironmentExecutor):
    """Runs ``script(frame, emit)`` for every ``run_task``; records every command it receives."""

    starts = 0

    def __init__(self, script: Script = answer, *, ack_cancel: bool = True, fail_send: bool = False) -> None:
        self.script = script
        self.ack_cancel = ack_cancel
        self.fail_send = fail_send
        self.commands: list[Frame] = []
        self.events: asyncio.Queue[Any] | None = None
        self.running: dict[str, asyncio.Task[None]] = {}
        self.recv_error: BaseException | None = None
        self.stopped = False
        self.forgotten: list[str] = []

    async def start(
        self, *, environment_name: str, environment_config: Mapping[str, Any], run_config: Mapping[str, Any]
    ) -> None:
        type(self).starts += 1
        self.events = asyncio.Queue()

    def emit(self, frame: Any) -> None:
        assert self.events is not None
        self.events.put_nowait(frame)

    def crash(self, exc: BaseException) -> None:
        """Make the next ``recv`` raise, as an executor whose connection died would."""
        self.recv_error = exc
        self.emit(None)

    async def send(self, frame: Frame) -> None:
        if frame["type"] == "run_task":
            self._take_run(frame)
            return
        self.commands.append(frame)
        if frame["type"] == "cancel_task":
            task = self.running.get(frame["run_id"])
            if task is not None:
                task.cancel()
            if self.ack_cancel:
                self.emit({"type": "task_cancelled", "run_id": frame["run_id"]})

    def _take_run(self, frame: Frame) -> None:
        self.commands.append(frame)
        if self.fail_send:
            raise ConnectionRefusedError("broker down")
        self.running[frame["run_id"]] = asyncio.get_running_loop().create_task(self.script(frame, self.emit))

    def forget(self, run_id: str) -> None:
        self.forgotten.append(run_id)

    async def recv(self) -> Frame:
        assert self.events is not None
        frame = await self.events.get()
        if self.recv_error is not None:
            exc, self.recv_error = self.recv_error, None
            raise exc
        return frame  # type: ignore[no-any-return]

    async def stop(self) -> None:
        self.stopped = True
        for task in self.running.values():
            task.cancel()

    def sent(self, kind: str) -> list[Frame]:
        return [c for c in self.commands if c["type"] == kind]


class NowaitScriptedExecutor(ScriptedExecutor):
    """The same, also taking runs through ``send_nowait``, as wove's backend executor does: once the environment
    is started, the runtime submits through it without a task per run."""

    def __init__(self, script: Script = answer, **options: Any) -> None:
        super().__init__(script, **options)
        self.nowait_runs = 0

    def send_nowait(self, frame: Frame) -> None:
        self.nowait_runs += 1
        self._take_run(frame)
