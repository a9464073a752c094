"""The submitting process gives up with 100 remote tasks in flight: Ctrl-C in a script, or cancelling an asyncio task.

What must hold, on the ``process`` backend, Celery and Slurm: every run ends ``cancelled``; the cancel reaches each
backend run (the pool kills its busy workers and drops the queued runs; Celery workers hold every run id as revoked
and kill the pool children running them; Slurm shows every job CANCELLED); nothing keeps running or posting (once the
cancel settled the held tasks are released, and no task starts or finishes afterwards); the callback server shuts down
cleanly (no run or task left pending, nothing logged, its port released). Each test records the counts and how long
the cancel and the shutdown took.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from redis import Redis

import wove
from tests.integration.queue_support import ROOT, WorkerProcess, worker_env
from tests.reliability.support import (
    HANG_GUARD,
    SentFrames,
    eventually,
    pid_gone,
    record,
    revoked_on_workers,
    start_celery,
    unique_queue,
)
from tests.reliability.tasks import hold
from tests.services.redis import RedisServer
from tests.services.slurm import SlurmCluster
from wove import weave
from wove.environment import get_runtime

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: Runs in flight when the weave is cancelled.
ITEMS = 100
#: Redis database of this module's Celery worker.
CELERY_DB = 11
#: Output that must not appear on the script's standard error: tracebacks, leaked tasks, unclosed resources.
DIRTY = ("Traceback", "Task was destroyed", "Exception ignored", "ResourceWarning", "Unclosed", "never awaited")


def all_starts(folder: Path) -> list[int]:
    pids: list[int] = []
    for path in folder.glob("started-*"):
        text = path.read_text()
        pids += [int(line) for line in text[: text.rfind("\n") + 1].split()]
    return pids


def finished(folder: Path) -> list[Path]:
    return list(folder.glob("finished-*"))


class Backend:
    """Where the held tasks run, and what shows that a cancel reached them."""

    name = ""
    #: Held tasks that run at once (the rest wait in the backend's queue).
    running = 1

    def executor(self) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    async def saw_cancel(self, run_ids: list[str], pids: list[int]) -> dict[str, Any]:
        """Wait until the backend shows the cancel of every run; return what it showed."""
        await eventually(lambda: all(pid_gone(pid) for pid in pids), f"the workers {pids} of the held tasks ended")
        return {}

    async def settle(self) -> None:
        """Wait until the backend has nothing left to do with the cancelled runs (queues drained, jobs ended)."""

    def configure(self) -> None:
        executor, config = self.executor()
        wove.config(
            environments={"default": {"executor": "local"}, "jobs": {"executor": executor, "executor_config": config}}
        )


class ProcessBackend(Backend):
    name = "process"
    running = 4

    def executor(self) -> tuple[str, dict[str, Any]]:
        return "process", {"max_workers": self.running}


class CeleryBackend(Backend):
    name = "celery"
    running = 2

    def __init__(self, worker: WorkerProcess, broker: str, queue: str) -> None:
        self.worker, self.broker, self.queue = worker, broker, queue

    def executor(self) -> tuple[str, dict[str, Any]]:
        return "celery", {"broker_url": self.broker, "queue": self.queue}

    async def saw_cancel(self, run_ids: list[str], pids: list[int]) -> dict[str, Any]:
        await super().saw_cancel(run_ids, pids)  # SIGKILL from revoke(terminate=True)
        missing: set[str] = set(run_ids)

        def all_revoked() -> bool:
            missing.intersection_update(set(run_ids) - revoked_on_workers(self.broker))
            return not missing

        await eventually(all_revoked, "the worker holds every run id as revoked")
        return {"revoked_on_worker": len(run_ids) - len(missing)}

    async def settle(self) -> None:
        client = Redis.from_url(self.broker)
        try:
            await eventually(
                lambda: client.llen(self.queue) == 0 and client.hlen("unacked") == 0,
                "the worker consumed (and discarded) every revoked message",
            )
        finally:
            client.close()
        await eventually(lambda: len(self.worker.children()) == self.running, "celery refilled its pool")


class SlurmBackend(Backend):
    name = "slurm"
    running = 2

    def __init__(self, cluster: SlurmCluster, output_dir: Path) -> None:
        self.cluster, self.output_dir = cluster, output_dir
        self.prefix = f"rel-cancel-{uuid.uuid4().hex[:6]}"

    def executor(self) -> tuple[str, dict[str, Any]]:
        config = {"output_dir": str(self.output_dir), "env": {"PYTHONPATH": str(ROOT)}, "job_name_prefix": self.prefix}
        return "slurm", config

    def states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name, state in self.cluster.jobs().values():
            if name.startswith(self.prefix + "-"):
                counts[state] = counts.get(state, 0) + 1
        return counts

    def submitted(self) -> int:
        return sum(self.states().values())

    async def saw_cancel(self, run_ids: list[str], pids: list[int]) -> dict[str, Any]:
        await eventually(lambda: self.states() == {"CANCELLED": len(run_ids)}, "Slurm shows every job CANCELLED")
        await super().saw_cancel(run_ids, pids)
        return {"jobs_cancelled": self.states()["CANCELLED"]}


@pytest.fixture(scope="module")
def celery_worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryBackend]:
    broker, queue = redis_server.url(CELERY_DB), unique_queue("cancel")
    worker = start_celery(tmp_path_factory.mktemp("celery-cancel"), broker, queue, concurrency=CeleryBackend.running)
    try:
        yield CeleryBackend(worker, broker, queue)
    finally:
        worker.stop()


@pytest.fixture(params=["process", "celery", "slurm"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "celery":
        chosen: Backend = request.getfixturevalue("celery_worker")
    elif request.param == "slurm":
        chosen = SlurmBackend(request.getfixturevalue("slurm_cluster"), tmp_path / "slurm-out")
    else:
        chosen = ProcessBackend()
    chosen.configure()
    return chosen


async def in_flight(backend: Backend, folder: Path, ready: Any) -> None:
    """Until every run is submitted (``ready()``) and as many held tasks started as run at once."""
    await eventually(ready, f"{ITEMS} runs in flight")
    if isinstance(backend, SlurmBackend):
        await eventually(lambda: backend.submitted() == ITEMS, f"Slurm knows all {ITEMS} jobs")
    await eventually(lambda: len(all_starts(folder)) >= backend.running, f"{backend.running} held tasks started")


async def nothing_runs_afterwards(backend: Backend, folder: Path) -> None:
    """Once every run is closed and the backend showed the cancel, release the held tasks: none may start or finish
    any more. (Between the cancel and the closing of a run, a worker may still have been told to start its task:
    those starts are counted here, before the backend settles.)"""
    started = len(all_starts(folder))
    await backend.settle()
    (folder / "release").touch()
    await asyncio.sleep(1.0)  # a held task still running polls for its release every 20 ms
    assert finished(folder) == [], "a cancelled task ran to its end"
    assert len(all_starts(folder)) == started, "a task started after its run was closed"


def port_free(port: int) -> bool:
    """Nothing listens on ``port``: a new server (``SO_REUSEADDR``, as asyncio's) can take it."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


# -- Ctrl-C in a script ------------------------------------------------------------------------------------------------


async def test_ctrl_c_in_a_script(backend: Backend, tmp_path: Path) -> None:
    folder, status = tmp_path / "tasks", tmp_path / "status.json"
    folder.mkdir()
    executor, config = backend.executor()
    settings = {"executor": executor, "executor_config": config, "items": ITEMS, "folder": str(folder)}
    settings["status"] = str(status)
    script = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.reliability.cancel_weave",
        json.dumps(settings),
        cwd=ROOT,
        env={**os.environ, **worker_env(PYTHONWARNINGS="always::ResourceWarning")},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await in_flight(backend, folder, status.exists)
        started = len(all_starts(folder))
        pids = all_starts(folder)
        interrupted = time.time()
        script.send_signal(signal.SIGINT)
        output, errors = await asyncio.wait_for(script.communicate(), HANG_GUARD)
    finally:
        if script.returncode is None:
            script.kill()
            await script.communicate()
    out, err = output.decode(), errors.decode()
    assert script.returncode == 130, err
    summary = json.loads(out.strip().splitlines()[-1])
    runs = summary["runs"]
    assert len(runs) == ITEMS and {run["status"] for run in runs} == {"cancelled"}
    assert summary["pending_after_cancel"] == {"runs": 0, "callback_runs": 0}
    assert summary["port_released"] and summary["threads_after_shutdown"] == [], summary
    assert not [line for line in err.splitlines() if any(word in line for word in DIRTY)], err
    shown = await backend.saw_cancel([run["run_id"] for run in runs], pids + summary["worker_pids"])
    await nothing_runs_afterwards(backend, folder)
    record(
        "cancel: Ctrl-C",
        backend=backend.name,
        in_flight=json.loads(status.read_text())["in_flight"],
        started_before_cancel=started,
        cancelled=sum(run["status"] == "cancelled" for run in runs),
        finished_after_cancel=len(finished(folder)),
        started_after_cancel=len(all_starts(folder)) - started,
        cancel_seconds=round(summary["interrupted_at"] - interrupted, 3),
        shutdown_seconds=summary["shutdown_seconds"],
        runtime_tasks_after_cancel=summary["runtime_tasks_after_cancel"],
        port_released=summary["port_released"],
        stderr_lines=len(err.splitlines()),
        **shown,
    )


# -- cancelling the asyncio task that runs the weave ------------------------------------------------------------------


async def test_cancelling_the_asyncio_task(
    backend: Backend, sent: SentFrames, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    folder = tmp_path / "tasks"
    folder.mkdir()
    weaves: list[Any] = []

    async def run() -> None:
        async with weave(items=range(ITEMS), folder=str(folder)) as w:
            weaves.append(w)
            w.do("items", environment="jobs")(hold)

    runtime = get_runtime()
    running = asyncio.ensure_future(run())
    try:
        await in_flight(backend, folder, lambda: len(runtime._runs) == ITEMS)
        started, pids = len(all_starts(folder)), all_starts(folder)
        env = runtime._environments["jobs"]
        server = env.executor.server  # type: ignore[attr-defined]
        port = int(urlsplit(server.public_url).port or 0)
        cancelled_at = time.monotonic()
        running.cancel()
        await asyncio.wait([running], timeout=HANG_GUARD)
        cancel_seconds = time.monotonic() - cancelled_at
        assert running.cancelled(), "the weave did not end as cancelled"
    finally:
        running.cancel()  # when an assertion failed above
        await asyncio.gather(running, return_exceptions=True)
    records = weaves[0].result.records["hold"]
    assert len(records) == ITEMS and {r.status for r in records} == {"cancelled"}
    assert len(runtime._runs) == 0 and not server.pending_runs
    assert sent.submissions("hold") == ITEMS and sent.cancels == ITEMS  # one cancel per run, none twice
    shown = await backend.saw_cancel([r.run_id for r in records], pids)
    await nothing_runs_afterwards(backend, folder)

    began = time.monotonic()
    await asyncio.to_thread(wove.shutdown)
    shutdown_seconds = time.monotonic() - began
    gc.collect()
    assert port_free(port)
    assert not [t for t in threading.enumerate() if t.name == "wove-runtime"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    record(
        "cancel: asyncio task",
        backend=backend.name,
        in_flight=ITEMS,
        started_before_cancel=started,
        cancelled=sum(r.status == "cancelled" for r in records),
        cancels_sent=sent.cancels,
        finished_after_cancel=len(finished(folder)),
        started_after_cancel=len(all_starts(folder)) - started,
        cancel_seconds=round(cancel_seconds, 3),
        shutdown_seconds=round(shutdown_seconds, 3),
        port_released=True,
        **shown,
    )
