"""Helpers of the reliability suite: counting what was submitted and resolved, Celery workers, recorded numbers.

Every scenario reports what it counted and measured through :func:`record`; with ``WOVE_RELIABILITY_LOG`` set to a
file, each record is appended there as a JSON line (``docs/reliability.md`` is written from such a run).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.integration.queue_support import WorkerProcess, python_command, start_worker
from wove._types import Frame
from wove.environment.remote import BackendAdapterEnvironmentExecutor

#: A wait that should never be reached: a run still pending after it would fail the test by its timeout instead.
NEVER = 600.0
#: How long a test waits for something that normally takes well under a second, before it calls it a hang.
HANG_GUARD = 60.0


def record(scenario: str, **measured: Any) -> None:
    """Print what a scenario counted and measured; append it to ``$WOVE_RELIABILITY_LOG`` as a JSON line."""
    line = json.dumps({"scenario": scenario, **measured}, default=str)
    print(f"\nreliability: {line}")
    path = os.environ.get("WOVE_RELIABILITY_LOG")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


@dataclass
class SentFrames:
    """Command frames the runtime sent to backend executors in this process, counted by type and task name."""

    by_type: collections.Counter[str] = field(default_factory=collections.Counter)
    run_tasks: collections.Counter[str] = field(default_factory=collections.Counter)
    cancelled_runs: list[str] = field(default_factory=list)

    def submissions(self, task_name: str) -> int:
        return self.run_tasks[task_name]

    @property
    def cancels(self) -> int:
        return self.by_type["cancel_task"]


def count_sent(monkeypatch: pytest.MonkeyPatch) -> SentFrames:
    """Count every ``run_task`` and ``cancel_task`` the runtime hands any backend executor (a submission each)."""
    counts = SentFrames()
    original_send, original_nowait = (
        BackendAdapterEnvironmentExecutor.send,
        BackendAdapterEnvironmentExecutor.send_nowait,
    )

    def count(frame: Frame) -> None:
        kind = str(frame.get("type"))
        counts.by_type[kind] += 1
        if kind == "run_task":
            counts.run_tasks[str(frame.get("task_name"))] += 1
        elif kind == "cancel_task":
            counts.cancelled_runs.append(str(frame.get("run_id")))

    async def counting_send(self: BackendAdapterEnvironmentExecutor, frame: Frame) -> None:
        if frame.get("type") != "run_task":  # runs reach send_nowait, through send or straight from the runtime
            count(frame)
        await original_send(self, frame)

    def counting_send_nowait(self: BackendAdapterEnvironmentExecutor, frame: Frame) -> None:
        count(frame)
        original_nowait(self, frame)

    monkeypatch.setattr(BackendAdapterEnvironmentExecutor, "send", counting_send)
    monkeypatch.setattr(BackendAdapterEnvironmentExecutor, "send_nowait", counting_send_nowait)
    return counts


def start_celery(log_dir: Path, broker: str, queue: str, *, concurrency: int = 2) -> WorkerProcess:
    """A prefork Celery worker of wove's shipped app on ``queue``, started as the docs say; returned once ready."""
    name = f"{queue}-{uuid.uuid4().hex[:6]}"
    command = python_command("celery", "-A", "wove.integrations.celery_worker", "worker", "-P", "prefork")
    command += ["-c", str(concurrency), "-Q", queue, "-n", f"{name}@%h", "--loglevel=INFO"]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    env = {"WOVE_CELERY_BROKER_URL": broker}
    return start_worker(command, log_dir / f"{name}.log", env, " ready.", f"celery worker {name}")


def unique_queue(prefix: str) -> str:
    return f"wove-rel-{prefix}-{uuid.uuid4().hex[:6]}"


async def eventually(condition: Callable[[], Any], what: str, timeout: float = HANG_GUARD) -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not true after {timeout}s")
        await asyncio.sleep(0.02)


def pid_gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts as gone)."""
    import psutil  # type: ignore[import-untyped]

    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def revoked_on_workers(broker: str) -> set[str]:
    """Task ids the running Celery workers on ``broker`` hold as revoked (asked over Celery's remote control)."""
    from celery import Celery

    app = Celery("wove-reliability-inspect", broker=broker, set_as_current=False)
    try:
        replies = app.control.inspect(timeout=2.0).revoked() or {}
    finally:
        app.close()
    return {str(task_id) for ids in replies.values() for task_id in ids}
