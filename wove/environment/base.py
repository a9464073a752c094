"""The executor contract: four async methods that every environment executor implements.

The runtime sends command frames (``run_task``, ``cancel_task``, ``shutdown``) and receives event frames
(``task_started``, ``heartbeat``, ``task_result``, ``task_error``, ``task_cancelled``). An executor never
resolves runs itself; it only moves frames. That keeps custom executors small: subclass, fill the four methods.

Command frames::

    {"type": "run_task", "run_id", "task_id", "task_name", "callable", "args": {kw: value}, "delivery": {...}}
    {"type": "cancel_task", "run_id", "task_id"}
    {"type": "shutdown"}

Event frames all carry ``type`` and ``run_id`` (and ``task_id`` when known)::

    task_started   {"host"?, "pid"?}
    heartbeat      {}
    task_result    {"result"}
    task_error     {"exception"?, "error": {"kind", "message", "traceback", "retryable", "source"}}
    task_cancelled {}

A terminal frame may come without a ``task_started`` before it (a short run, a failure before the task ran); it
may then carry ``started_at``, ``host`` and ``pid`` itself.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from wove._types import Frame


class EnvironmentExecutor(abc.ABC):
    """Moves frames between the runtime and the place where an environment's tasks run."""

    @abc.abstractmethod
    async def start(
        self,
        *,
        environment_name: str,
        environment_config: Mapping[str, Any],
        run_config: Mapping[str, Any],
    ) -> None:
        """Acquire resources (pools, servers, clients). Called once before any ``send``."""

    @abc.abstractmethod
    async def send(self, frame: Frame) -> None:
        """Accept one command frame. Must not wait for the task to finish."""

    def send_nowait(self, frame: Frame) -> None:
        """Optional: accept a ``run_task`` frame without awaiting anything, as ``send`` would.

        An executor that can take a run synchronously overrides this; the runtime then submits runs to it without
        an asyncio task per run (it checks for the override once, at start). The default is not to offer it.
        """
        raise NotImplementedError

    @abc.abstractmethod
    async def recv(self) -> Frame:
        """Return the next event frame, waiting until one exists."""

    def deliver_to(self, sink: Callable[[Frame], None]) -> None:  # noqa: B027 - optional hook, no-op by default
        """Optionally hand event frames to ``sink`` (in the runtime's loop) instead of queueing them for ``recv``.

        The runtime calls this once, right after ``start``. An executor that takes the offer skips a queue hop per
        frame; ``recv`` must still raise when the executor fails, so the runtime notices. Ignoring it is fine.
        """

    def forget(self, run_id: str) -> None:  # noqa: B027 - optional hook, no-op by default
        """Optional: the runtime stopped waiting for ``run_id`` without cancelling it (its worker was presumed lost).

        Release what the run holds (a callback URL, a job watch); its late frames may then be refused or dropped.
        Called in the runtime's loop; must not block.
        """

    @abc.abstractmethod
    async def stop(self) -> None:
        """Release resources. Must be safe to call twice and after a failed ``start``."""

    async def __aenter__(self) -> EnvironmentExecutor:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
